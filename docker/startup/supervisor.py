"""TorchServe and nginx in front of it as the children of this process, which runs as PID 1: started, watched,
stopped on SIGTERM or SIGINT, TorchServe's exit code passed on, and every exited child reaped. When nginx exits
on its own, TorchServe is stopped too: a container that cannot be reached must be restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from startup.report import say
from startup.settings import Settings

POLL_S = 0.25


class Stopped(Exception):
    """A stop signal arrived before TorchServe was started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Supervisor:
    """TorchServe (and nginx) as this process's children: started, watched, stopped; every exited child reaped
    (as PID 1 this process inherits orphans, such as workers left behind by a killed frontend)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.code: int | None = None
        self.stop_requested = False
        self.stop_deadline: float | None = None
        self.front: subprocess.Popen | None = None
        self.front_failure: str | None = None  # why nginx exited, when nobody asked it to

    def start(self, command: list[str], environment: dict[str, str]) -> None:
        # Its own process group: whatever the frontend leaves behind can be killed with it at the end.
        self.process = subprocess.Popen(
            command, env=environment, cwd=self.settings.tmp_dir, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def start_front(self, command: list[str]) -> None:
        """nginx in the foreground, its log on this process's stderr."""
        self.front = subprocess.Popen(
            command, cwd=self.settings.tmp_dir, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def signal(self, signum: int) -> None:
        """Forward a stop signal to TorchServe (its shutdown hook stops the workers); kill it if it outlasts
        STOP_TIMEOUT."""
        if self.process is None:
            raise Stopped(signum)
        if self.code is None:
            say(f"{signal.Signals(signum).name}: stopping TorchServe")
            self.settings.ready_file.unlink(missing_ok=True)
            os.kill(self.process.pid, signum)
            if not self.stop_requested:
                self.stop_requested = True
                self.stop_deadline = time.monotonic() + self.settings.stop_timeout

    def reap(self) -> int | None:
        """Collect exited children; TorchServe's exit code (128 + signal when killed) once it has exited."""
        while self.code is None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.process and pid == self.process.pid:
                code = os.waitstatus_to_exitcode(status)
                self.code = 128 - code if code < 0 else code
                self.process.returncode = self.code
            elif self.front and pid == self.front.pid:
                self.front.returncode = os.waitstatus_to_exitcode(status)
                if not self.stop_requested:
                    self.front_failure = f"nginx exited with code {self.front.returncode}; stopping TorchServe"
                    say(self.front_failure)
                    self.signal(signal.SIGTERM)
        if self.stop_deadline is not None and self.code is None and time.monotonic() > self.stop_deadline:
            say(f"TorchServe still running {self.settings.stop_timeout:.0f} s after the stop signal; killing it")
            self.kill_group(signal.SIGKILL)
            self.stop_deadline = None
        return self.code

    def kill_group(self, signum: int) -> None:
        for process in (self.process, self.front):
            if process:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        while self.reap() is None:
            time.sleep(POLL_S)
        self.stop_front()
        self.kill_group(signal.SIGKILL)  # workers outliving a frontend that died
        return self.code

    def stop_front(self) -> None:
        """nginx, once TorchServe is gone: a graceful stop, which its idle connections do not hold up."""
        if not self.front or self.front.returncode is not None:
            return
        os.kill(self.front.pid, signal.SIGQUIT)
        deadline = time.monotonic() + 5
        while self.front.returncode is None and time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.front.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.front.returncode = os.waitstatus_to_exitcode(status)
            else:
                time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns TorchServe's exit code."""
        if self.process and self.code is None:
            self.signal(signal.SIGTERM)
        return self.wait()


class StopSignals:
    """SIGTERM and SIGINT, which PID 1 would otherwise ignore (it gets no default signal handling). Before
    TorchServe runs they end the start; once it runs they are forwarded to it."""

    def __init__(self):
        self.supervisor: Supervisor | None = None  # set just before TorchServe starts
        self.stopped_early: int | None = None  # a stop signal that came before TorchServe ran
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum: int, _frame) -> None:
        if self.supervisor is None or self.supervisor.process is None:
            # Raised wherever the main thread is; code in between (the database driver) may turn it into
            # an error of its own, so the signal is remembered as well.
            self.stopped_early = signum
            raise Stopped(signum)
        self.supervisor.signal(signum)
