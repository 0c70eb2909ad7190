"""The background build of the Kubernetes tools (conftest.py) must yield the CPU to the tests."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import low_priority


def test_the_background_build_runs_at_low_priority_in_the_tests_session(tmp_path):
    process = low_priority(["sleep", "30"], subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{process.pid}/comm").read_text().strip() != "sleep":  # nice has set its priority and run it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == 15
        assert os.getsid(process.pid) == os.getsid(0)  # so its nice value counts against the tests
        autogroup = Path(f"/proc/{process.pid}/autogroup")
        if autogroup.exists():  # kernels with CONFIG_SCHED_AUTOGROUP; empty for the root group (CI's session)
            assert autogroup.read_text() == Path("/proc/self/autogroup").read_text()
        assert os.getpgid(process.pid) == process.pid  # a group of its own, killed as one at the session's end
        os.killpg(process.pid, 15)
        assert process.wait(timeout=10) == -15
    finally:
        process.kill()
        process.wait()
