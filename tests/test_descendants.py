"""The tests' process watcher (tests/descendants.py) knows a child by what it ends up running, however long the
child spends between fork and exec."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
from descendants import Descendants

# A parent whose child, after fork, waits for a file before it execs `sleep 2`: the watcher sees it first with
# the parent's command line, as it can see TorchServe's JVM on a busy machine.
LATE_EXEC = """
import os, sys, time
child = os.fork()
if child == 0:
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    os.execvp("sleep", ["sleep", "2"])
os.waitpid(child, 0)
"""


def test_a_child_seen_before_its_exec_is_known_by_the_program_it_then_runs(tmp_path):
    go = tmp_path / "exec"
    parent = subprocess.Popen([sys.executable, "-c", LATE_EXEC, str(go)])
    with Descendants(parent.pid) as seen:
        while not seen.everything():
            assert parent.poll() is None
            time.sleep(0.05)
        (child,) = seen.everything()
        assert seen.command(child).startswith(sys.executable)  # caught before its exec
        go.touch()
        parent.wait(30)
    assert seen.ran("sleep 2") == [child]
    assert sys.executable in seen.command(child) and "sleep 2" in seen.command(child)
    assert seen.ran("no such program") == []


def test_what_it_saw_includes_children_that_have_exited():
    parent = subprocess.Popen(["bash", "-c", "sleep 0.5; sleep 0.5"])
    with Descendants(parent.pid) as seen:
        parent.wait(30)
    gone, alive = psutil.wait_procs(seen.everything(), timeout=5)
    assert len(gone) >= 1 and not alive
    assert seen.ran("sleep 0.5")
