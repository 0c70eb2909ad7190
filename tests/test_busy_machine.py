"""scripts/test-busy.sh (make test-busy): the tests it is given run beside a busy loop on every core, it exits
with pytest's code, and no busy loop outlives it."""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest
from conftest import ROOT
from descendants import Descendants

SCRIPT = ROOT / "scripts" / "test-busy.sh"


@pytest.mark.parametrize(
    "test, code", [("tests/test_descendants.py", 0), ("tests/test_descendants.py::no_such_test", 4)]
)
def test_the_tests_run_beside_a_busy_loop_per_core_and_none_is_left(test, code):
    process = subprocess.Popen(
        [str(SCRIPT), test, "-q"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with Descendants(process.pid) as seen:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == code, output
    assert f"test-busy: {os.cpu_count()} busy loops beside pytest" in output
    assert f"test-busy: pytest exited {code} after" in output
    assert len(seen.ran("-m pytest")) == 1
    _, alive = psutil.wait_procs(seen.everything(), timeout=10)
    assert not alive, [seen.command(process) for process in alive]
