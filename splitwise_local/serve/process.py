"""One child process of the launcher, kept on a short leash.

Each child runs in a session of its own, so a Ctrl-C in the terminal reaches only the launcher
(which then stops the children in order) and so a signal sent to the child's process group also
reaches whatever the child spawned itself (vLLM's engine-core process). Its output goes, line by
line, to its log file and to the console. A child may be started again after it exited (the
supervisor's restarts); its log then continues, and what it says about its cause of death is
read from the current run's part of the log only.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from splitwise_local.serve.console import LEVELS, Console, line_level

RUN_ENV = "SPLITWISE_RUN_DIR"  # set in every child and inherited below: finds a run's processes
COMPONENT_ENV = "SPLITWISE_COMPONENT"  # the child's name, likewise: finds one child's leftovers
ORPHAN_GRACE_S = 3.0  # for what a child left running after it exited
# "ModuleNotFoundError: No module named 'x'" opening a line or a vLLM message ("... [file.py:1] ");
# elsewhere in a line it is prose ("fd limit errors like `OSError: ...`").
_EXCEPTION_LINE = re.compile(r"(?:^|\] )([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def terminate(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; reaps it either way."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note saying there is none."""
    try:
        with path.open("rb") as file:
            last = collections.deque(file, maxlen=lines)
    except OSError:
        return f"(no log at {path})"
    return b"".join(last).decode(errors="replace").rstrip() or f"({path} is empty)"


def first_exception(path: Path, offset: int = 0) -> str | None:
    """The first Python exception line in a log from byte `offset` on: the root cause, where the
    tail usually shows only what it caused (vLLM's "Engine core initialization failed. See root
    cause above")."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            for raw in file:
                match = _EXCEPTION_LINE.search(raw.decode(errors="replace").rstrip())
                if match:
                    return f"{match.group(1)}: {match.group(2)}"
    except OSError:
        return None
    return None


class Child:
    """A named child process whose output is copied to `log_path` and to the console."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        console: Console,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.console = console
        self.popen: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._log_offset = 0  # where this run of the child begins in its log
        self.starts = 0
        # Once asked to stop, its output goes to the log only: vLLM reports its own orderly
        # shutdown with error tracebacks that would alarm a user who just pressed Ctrl-C.
        self.stopping = False

    def start(self, note: str | None = None) -> None:
        """Starts the child (again, after it exited); `note` goes into its log first, so a
        reader of the log sees where one run ends and the next begins."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._pump is not None:
            self._pump.join(2.0)  # the previous run's last lines land before the note
        with self.log_path.open("ab") as log:
            if note:
                log.write(f"\n----- {note} -----\n".encode())
            self._log_offset = log.tell()
        self.stopping = False
        self.starts += 1
        self.popen = subprocess.Popen(
            self.command,
            env={**self.env, COMPONENT_ENV: self.name},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pump = threading.Thread(
            target=self._copy_output, name=f"{self.name}-log", daemon=True
        )
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        level = LEVELS["info"]
        with self.log_path.open("ab") as log:
            for raw in self.popen.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip()
                level = line_level(line, level)
                if not self.stopping:
                    self.console.child_line(self.name, line, level)

    @property
    def pid(self) -> int | None:
        """Its process id; None before it started."""
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started), else the exit code (-N: killed by signal N)."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def running(self) -> bool:
        """Started and not exited yet."""
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, to explain how it ended."""
        return log_tail(self.log_path, lines)

    def first_exception(self) -> str | None:
        """The root cause in this run's part of the log (not an earlier run's)."""
        return first_exception(self.log_path, self._log_offset)

    def family(self) -> list[psutil.Process]:
        """The child and every process below it, found now (they reparent once it exits)."""
        if self.popen is None:
            return []
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_group(self, sig: int) -> None:
        """Sends `sig` to the child's whole process group (its session leader is the child)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILLs the child and everything it left anywhere (its group, and processes that
        left the group, found by their run and component tags), and reaps it: nothing of a dead
        or frozen child may hold its port, memory or shared segments when it starts again."""
        if self.popen is None:
            return
        self.stopping = True
        self.signal_group(signal.SIGKILL)
        run = self.env.get(RUN_ENV)
        for process in tagged(run, self.name) if run else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.reap()

    def reap(self, timeout: float = 5.0) -> None:
        """Collects the exit status, so the child does not linger as a zombie."""
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)

    def drain(self, timeout: float = 2.0) -> None:
        """Waits for the last lines of output to reach the log (the pipe closes once every
        process that inherited it has exited)."""
        if self._pump is not None:
            self._pump.join(timeout)


def alive(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running (a zombie has finished; it only awaits its parent)."""
    result = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                result.append(process)
        except psutil.NoSuchProcess:
            continue
    return result


def wait_until(
    done: Callable[[], bool], timeout: float, hurry: threading.Event, children: Sequence[Child]
) -> None:
    """Polls `done()` until true, `timeout` passes or `hurry` is set, reaping `children` meanwhile
    so an exited child stops counting as running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not hurry.is_set():
        for child in children:
            child.popen.poll()
        if done():
            return
        time.sleep(0.1)


def stop_together(children: Sequence[Child], grace: float, hurry: threading.Event) -> None:
    """Stops children the way they expect, within `grace` seconds (less once `hurry` is set).

    SIGTERM goes to each child only, not its whole group: vLLM's API server then shuts its own
    engine core down in order (signalled together, the core dies first and the server logs an
    engine failure). What outlives its parent gets SIGTERM once the parent has gone, and
    whatever is left at the end, group and descendants alike, gets SIGKILL.
    """
    started = [child for child in children if child.popen is not None]
    processes = [p for child in started for p in child.family()]
    for child in started:
        child.stopping = True
        if child.running:
            child.popen.send_signal(signal.SIGTERM)
    began = time.monotonic()
    wait_until(lambda: not any(c.running for c in started), grace, hurry, started)
    orphans = alive(processes)
    for process in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    left = max(0.0, min(ORPHAN_GRACE_S, grace - (time.monotonic() - began)))
    wait_until(lambda: not alive(orphans), left, hurry, started)
    for child in started:
        child.signal_group(signal.SIGKILL)
    for process in alive(processes):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    for child in started:
        child.reap()


def tagged(run: str, component: str | None = None) -> list[psutil.Process]:
    """Every live process whose environment says it belongs to `run` (its `RUN_ENV` value), and
    to `component` if given, however it left its parent's process group or was reparented."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid():
                continue
            env = process.environ()
            if env.get(RUN_ENV) == run and component in (None, env.get(COMPONENT_ENV)):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return alive(found)
