"""Every process that runs under a parent while a test watches it, known by what it ends up running.

A child caught between fork and exec still shows its parent's command line, and on a busy machine that
window is wide. So each process's command line is read again at every look and on every question, and a
process matches a part if any command line it has shown contains it."""

from __future__ import annotations

import contextlib
import threading

import psutil

INTERVAL_S = 0.2


class Descendants:
    """Watches the processes under `pid` from start() until stop(); `with Descendants(pid):` does both."""

    def __init__(self, pid: int):
        self.pid = pid
        self.commands: dict[psutil.Process, set[str]] = {}  # psutil.Process compares by PID and start time
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> Descendants:
        self._look()  # at once: a short-lived child is not left to the first interval
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._look()

    def __enter__(self) -> Descendants:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stopped.wait(INTERVAL_S):
            self._look()

    def _look(self) -> None:
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:  # the parent has exited
            children = []
        # Those seen before are read again: a child seen before its exec shows its own command line later.
        for process in {*self.everything(), *children}:
            self._note(process)

    def _note(self, process: psutil.Process) -> None:
        command = None
        # is_running() compares the start time too: a PID taken again by another program is not read as this one.
        with contextlib.suppress(psutil.Error):  # it has exited, or is a zombie
            if process.is_running():
                command = " ".join(process.cmdline())
        with self._lock:
            commands = self.commands.setdefault(process, set())
            if command is not None:
                commands.add(command)

    def everything(self) -> list[psutil.Process]:
        """Every process seen, running or not."""
        with self._lock:
            return list(self.commands)

    def ran(self, part: str) -> list[psutil.Process]:
        """The processes seen whose command lines, now or before, contain `part`."""
        self._look()
        with self._lock:
            return [
                process for process, commands in self.commands.items() if any(part in command for command in commands)
            ]

    def command(self, process: psutil.Process) -> str:
        """The command lines it showed, for a message: each one's start, so a long one (a JVM's classpath, a
        script) leaves room for the others."""
        with self._lock:
            return " | ".join(command[:200] for command in sorted(self.commands.get(process, ())))
