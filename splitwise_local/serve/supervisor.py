"""Starts children in stages, waits until each is ready, watches them, stops them in reverse.

A stage is a group of children that may start and stop together (the two engines); stages start
in order (the store before the engines) and stop in the opposite order, so nothing is ever left
talking to a component that has already gone. Any failure while starting stops what was started
and raises `StartupError` with one message naming the component and the tail of its log.
"""

from __future__ import annotations

import contextlib
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import psutil

from splitwise_local.serve.console import Console
from splitwise_local.serve.process import Child, stop_together, tagged

LAUNCHER = "launcher"
PROGRESS_EVERY_S = 30.0
POLL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StartupError(RuntimeError):
    """A component that exited or never became ready; the message is what the user reads."""


class StopRequested(BaseException):
    """Raised in the main thread by SIGINT, SIGTERM or SIGHUP so startup and serving unwind.

    A BaseException, like KeyboardInterrupt: code that tolerates ordinary errors (a readiness
    probe's `except Exception`) must not swallow a stop request.
    """


@dataclass
class Readiness:
    """How to tell that a child is ready: `check()` is true (exceptions count as not yet)."""

    check: Callable[[], bool]
    what: str

    def ready(self) -> bool:
        try:
            return bool(self.check())
        except Exception:
            return False


def quoted_tail(child: Child) -> str:
    """The end of a child's log, indented so it reads as a quote under the launcher's line."""
    return textwrap.indent(child.tail(), "  | ", lambda line: True)


def describe_exit(child: Child, when: str) -> str:
    """How `child` ended and when, with the exception that made it exit and the end of its log:
    the one message a user needs to fix a failed start."""
    code = child.returncode
    killed = code is not None and code < 0
    how = f"was killed by signal {-code}" if killed else f"exited ({code})"
    cause = None if killed else child.first_exception()  # a kill has no exception to show
    cause = f" ({cause})" if cause else ""
    return (
        f"{child.name} {how} {when}{cause}; last lines of {child.log_path}:\n{quoted_tail(child)}"
    )


class Supervisor:
    """Owns the launcher's children from start to stop."""

    def __init__(self, console: Console, run: str, stop_grace: float = 15.0) -> None:
        self.console = console
        self.run = run
        self.stop_grace = stop_grace
        self.stages: list[list[Child]] = []
        self._hurry = threading.Event()

    @property
    def children(self) -> list[Child]:
        return [child for stage in self.stages for child in stage]

    def say(self, text: str) -> None:
        self.console.say(LAUNCHER, text)

    def start_stage(self, members: Sequence[tuple[Child, Readiness]], timeout: float) -> None:
        """Starts the children of one stage together and returns once all of them are ready."""
        stage: list[Child] = []
        self.stages.append(stage)
        for child, _ in members:
            self.say(f"starting {child.name} (log: {child.log_path})")
            child.start()
            stage.append(child)
        began = time.monotonic()
        waiting = dict(members)
        next_progress = began + PROGRESS_EVERY_S
        while waiting:
            for child, readiness in list(waiting.items()):
                if readiness.ready():
                    self.say(f"{child.name} ready after {time.monotonic() - began:.1f} s")
                    del waiting[child]
                elif not child.running:
                    raise StartupError(describe_exit(child, "before it was ready"))
            now = time.monotonic()
            if waiting and now - began > timeout:
                child, readiness = next(iter(waiting.items()))
                raise StartupError(
                    f"{child.name} was not ready within {timeout:.0f} s "
                    f"({readiness.what} never succeeded); "
                    f"last lines of {child.log_path}:\n{quoted_tail(child)}"
                )
            if waiting and now >= next_progress:
                names = ", ".join(child.name for child in waiting)
                self.say(f"still waiting for {names} ({now - began:.0f} s)")
                next_progress = now + PROGRESS_EVERY_S
            if waiting:
                time.sleep(POLL_S)

    def first_dead(self) -> Child | None:
        """A child that has exited although nobody asked it to, if any."""
        return next((child for child in self.children if child.returncode is not None), None)

    def report_death(self, child: Child) -> None:
        self.console.error(LAUNCHER, describe_exit(child, "while serving, so everything stops"))

    def stop_all(self) -> None:
        """Stops the stages newest first; a second Ctrl-C or SIGTERM skips the grace periods."""
        with self._signals(lambda *_: self._hurry.set()):
            children = self.children
            for stage in reversed(self.stages):
                running = [child for child in stage if child.popen is not None]
                if not running:
                    continue
                self.say("stopping " + ", ".join(child.name for child in running))
                stop_together(running, self.stop_grace, self._hurry)
            self.stages.clear()
            self._sweep()
            for child in children:
                child.drain()

    def _sweep(self) -> None:
        """Kills what a child left behind after it exited on its own (say, a crashed engine's
        helper processes), found by the run's tag in their environment."""
        leftovers = tagged(self.run)
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if leftovers:
            self.say(f"killed {len(leftovers)} leftover process(es) of this run")

    @contextmanager
    def stop_requests_raise(self) -> Iterator[None]:
        """While active, SIGINT, SIGTERM and SIGHUP raise `StopRequested` in the main thread."""

        def handler(signum: int, frame: FrameType | None) -> None:
            raise StopRequested(signal.Signals(signum).name)

        with self._signals(handler):
            yield

    @staticmethod
    @contextmanager
    def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
        """Installs `handler`, except for signals this process was told to ignore (nohup's
        SIGHUP, SIGINT for a background job), which stay ignored."""
        wanted = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
        previous = {sig: signal.signal(sig, handler) for sig in wanted}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
