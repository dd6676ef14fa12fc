"""One child process of the launcher, kept on a short leash.

Each child runs in a session of its own, so a Ctrl-C in the terminal reaches only the launcher
(which then stops the children in order) and so a signal sent to the child's process group also
reaches whatever the child spawned itself (vLLM's engine-core process). Its output goes, line by
line, to its log file and to the console. A child may be started again after it exited (the
supervisor's restarts); its log then continues, and what it says about its cause of death is
read from the current run's part of the log only.

A child dies with the process that started it, however that ends (kill -9, the OOM killer):
the kernel sends it SIGTERM when its parent goes (Linux's parent-death signal), and a guardian
process (serve/guardian.py) then kills whatever is still running after a grace period. A child
that outlived both (the guardian killed as well) is swept by the next launch (leftovers.py):
every child carries the tag of the process that started it, so what a dead launcher left is
told apart from what a live one runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from splitwise_local.serve.console import LEVELS, Console, line_level

RUN_ENV = "SPLITWISE_RUN_DIR"  # set in every child and inherited below: finds a run's processes
COMPONENT_ENV = "SPLITWISE_COMPONENT"  # the child's name, likewise: finds one child's leftovers
LAUNCHER_ENV = "SPLITWISE_LAUNCHER"  # `launcher_tag()` of the process that started the child
ORPHAN_GRACE_S = 3.0  # for what a child left running after it exited
# SIGTERM, not SIGKILL: vLLM's API server then stops its engine core and worker with it (measured:
# all gone 1.3 s after it), where a SIGKILLed one leaves them running, renamed and untagged.
PARENT_DEATH_SIGNAL = signal.SIGTERM
_PR_SET_PDEATHSIG = 1  # prctl(2)
# "ModuleNotFoundError: No module named 'x'" opening a line or a vLLM message ("... [file.py:1] ");
# elsewhere in a line it is prose ("fd limit errors like `OSError: ...`").
_EXCEPTION_LINE = re.compile(r"(?:^|\] )([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl(2), resolved before any fork (the child only calls it); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def dies_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child once the thread that forked it
    exits (PR_SET_PDEATHSIG); None where the kernel has no such signal."""
    if _prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


def launcher_tag(pid: int | None = None) -> str:
    """`pid:start time` of a process (this one by default): a pid alone may be reused."""
    process = psutil.Process(pid)
    return f"{process.pid}:{process.create_time():.2f}"


class _Spawner:
    """Forks every child from one thread that lives as long as this process, and starts this
    process's guardian with the first child.

    Linux sends the parent-death signal when the *thread* that forked a child exits, not its
    process: a child started from a supervisor's watcher thread (a restart) would otherwise be
    killed as soon as that watcher returned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0  # the pid whose thread and guardian these are (a fork needs its own)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._guardian: subprocess.Popen[bytes] | None = None

    def popen(self, command: Sequence[str], **options: object) -> subprocess.Popen[bytes]:
        """`subprocess.Popen(command, **options)`, forked by the spawner thread; the child's pid
        goes to the guardian."""
        with self._lock:
            if self._owner != os.getpid():
                self._guardian = _start_guardian()
                self._jobs = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(self._jobs,), name="spawner", daemon=True
                )
                thread.start()
                self._owner = os.getpid()
        done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._jobs.put((done, command, options))
        process = done.result()
        with self._lock, contextlib.suppress(OSError, ValueError):  # a guardian that is gone
            assert self._guardian is not None and self._guardian.stdin is not None
            self._guardian.stdin.write(f"{process.pid}\n".encode())
            self._guardian.stdin.flush()
        return process

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            done, command, options = jobs.get()
            try:
                done.set_result(subprocess.Popen(command, **options))
            except BaseException as exc:  # the caller raises it
                done.set_exception(exc)


def _start_guardian() -> subprocess.Popen[bytes]:
    """The guardian of this process's children (serve/guardian.py): it reads their pids from its
    stdin, whose end this process holds until it exits. In a session of its own, untagged, so
    no Ctrl-C, group kill or sweep aimed at the children reaches it."""
    env = {k: v for k, v in os.environ.items() if k not in (RUN_ENV, COMPONENT_ENV, LAUNCHER_ENV)}
    return subprocess.Popen(
        [sys.executable, "-m", "splitwise_local.serve.guardian", launcher_tag()],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


_spawner = _Spawner()


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
        self.popen = _spawner.popen(
            self.command,
            env={**self.env, COMPONENT_ENV: self.name, LAUNCHER_ENV: launcher_tag()},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=dies_with_parent(PARENT_DEATH_SIGNAL),
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
            if child.popen is not None:
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
        if child.popen is not None and child.running:
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
