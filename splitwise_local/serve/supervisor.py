"""Starts children in stages, waits until each is ready, watches them, stops them in reverse.

A stage is a group of children that may start and stop together (the engines); stages start in
order (the store before the engines) and stop in the opposite order, so nothing is ever left
talking to a component that has already gone. Any failure while starting stops what was started
and raises `StartupError` with one message naming the component and the tail of its log.

While serving, one watcher thread per child applies the `RestartPolicy`: a child that exits,
or whose health check has failed for longer than a deadline (frozen), is killed with whatever
it left, and started again after an exponential back-off, like systemd's `Restart=on-failure`
with a start limit or a Kubernetes liveness probe. Listeners hear of every death at once (the
proxy stops sending to a dead engine before any request fails on it) and of every return. Too
many restarts of one child within a window, or any death under `never`, is a failure: the
launcher then stops everything and exits 1.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Literal

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitwise_local.serve.console import Console
from splitwise_local.serve.process import Child, stop_together, tagged

LAUNCHER = "launcher"
PROGRESS_EVERY_S = 30.0
POLL_S = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESTART_MODES = ("on-failure", "never")


class StartupError(RuntimeError):
    """A component that exited or never became ready; the message is what the user reads."""


class StopRequested(BaseException):
    """Raised in the main thread by SIGINT, SIGTERM or SIGHUP so startup and serving unwind.

    A BaseException, like KeyboardInterrupt: code that tolerates ordinary errors (a readiness
    probe's `except Exception`) must not swallow a stop request.
    """


class Unhealthy(Exception):
    """Raised by a health check that got an answer saying the child cannot serve any more (vLLM's
    /health answers 503 once its engine core has died): dead now, no deadline to wait for."""


@dataclass
class Readiness:
    """How to tell that a child is ready: `check()` is true (exceptions count as not yet).

    While serving, the same check is the child's health check."""

    check: Callable[[], bool]
    what: str

    def ready(self) -> bool:
        """`check()` is true; an exception counts as not ready yet."""
        try:
            return bool(self.check())
        except Exception:
            return False

    def health(self) -> bool | str:
        """True when healthy, False without a good answer, or why the child says it is dead."""
        try:
            return bool(self.check())
        except Unhealthy as exc:
            return str(exc)
        except Exception:
            return False


@dataclass(frozen=True)
class RestartPolicy:
    """What happens to a child that dies or freezes while serving.

    `never`: the first death stops everything (no health checks). `on-failure`: restart after
    `backoff_initial_s`, doubling per restart within the window up to `backoff_max_s`; the
    `max_restarts + 1`-th failure within `window_s` seconds gives up. A child whose health check
    has not passed for `health_deadline_s` is frozen; checks run every `health_interval_s`,
    each bounded by the deadline itself (a check that hangs counts as failing). A check that
    raises `Unhealthy` (the child answered that it cannot serve) is a death, at once.
    """

    mode: Literal["on-failure", "never"] = "on-failure"
    health_deadline_s: float = 30.0
    health_interval_s: float = 1.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 600.0
    ready_timeout_s: float = 900.0

    def backoff(self, restart: int) -> float:
        """The wait before the `restart`-th restart within the window (counted from 1)."""
        return min(self.backoff_initial_s * 2 ** (restart - 1), self.backoff_max_s)


@dataclass(frozen=True)
class ChildEvent:
    """A child went down (`up` false, with its cause) or is serving again."""

    child: Child
    up: bool
    cause: str = ""


Listener = Callable[[ChildEvent], None]


def quoted_tail(child: Child) -> str:
    """The end of a child's log, indented so it reads as a quote under the launcher's line."""
    return textwrap.indent(child.tail(), "  | ", lambda line: True)


def how_it_ended(child: Child) -> tuple[str, str, str]:
    """For a child that has exited: the cause's kind for metrics (killed, exited), how it ended
    in words, and the exception that made it exit (if any)."""
    code = child.returncode
    if code is not None and code < 0:
        return "killed", f"was killed by signal {-code}", ""  # a kill has no exception to show
    cause = child.first_exception()
    return "exited", f"exited ({code})", f" ({cause})" if cause else ""


def describe_exit(child: Child, when: str) -> str:
    """How `child` ended and when, with the exception that made it exit and the end of its log:
    the one message a user needs to fix a failed start."""
    _, how, cause = how_it_ended(child)
    return (
        f"{child.name} {how} {when}{cause}; last lines of {child.log_path}:\n{quoted_tail(child)}"
    )


class Probe:
    """Runs a health check in a thread of its own, so a check that hangs (a frozen store holds
    its connections open) never stalls the watcher: it just never passes."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self._pool = self._new_pool()
        self._running: concurrent.futures.Future[bool | str] | None = None
        self._next = 0.0

    @staticmethod
    def _new_pool() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="probe")

    def poll(self, interval_s: float) -> bool | str | None:
        """Starts a check if none runs and `interval_s` has passed since the last one started;
        returns the result of one that has finished (see `Readiness.health`), else None."""
        now = time.monotonic()
        if self._running is None and now >= self._next:
            self._running = self._pool.submit(self.readiness.health)
            self._next = now + interval_s
        if self._running is not None and self._running.done():
            result, self._running = self._running.result(), None
            return result
        return None

    def forget(self) -> None:
        """Drops a check still running (it answers for a process that is gone) and its thread,
        which may hang for a while yet on a frozen child's socket."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        self._running = None
        self._next = 0.0

    def close(self) -> None:
        """Drops its thread without waiting: a frozen check must not hold up the stop."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Watch:
    """One child's watcher thread: notices its death or freeze and restarts it by the policy."""

    def __init__(
        self, supervisor: Supervisor, child: Child, readiness: Readiness, policy: RestartPolicy
    ) -> None:
        self.supervisor = supervisor
        self.child = child
        self.policy = policy
        self.probe = Probe(readiness)
        self.restarts: collections.deque[float] = collections.deque()
        self.thread = threading.Thread(target=self._run, name=f"watch-{child.name}", daemon=True)

    def _run(self) -> None:
        try:
            while (fault := self._wait_for_fault()) is not None:
                kind, cause = fault
                self.supervisor.notify(ChildEvent(self.child, up=False, cause=cause))
                if self.policy.mode == "never":
                    self.supervisor.give_up(
                        describe_exit(self.child, "while serving, so everything stops")
                    )
                    return
                if not self._restart(kind, cause):
                    return
        finally:
            self.probe.close()

    def _wait_for_fault(self) -> tuple[str, str] | None:
        """Blocks until the child dies or freezes: (kind, cause); None once stopping."""
        policy, child = self.policy, self.child
        last_ok = time.monotonic()
        while not self.supervisor.stopping.is_set():
            if child.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(POLL_S)  # returns at once when it exits
            if child.returncode is not None:
                kind, how, cause = how_it_ended(child)
                return kind, how + cause
            if policy.mode == "never":
                continue
            health = self.probe.poll(policy.health_interval_s)
            if isinstance(health, str):
                return "unhealthy", f"said it cannot serve ({health})"
            if health:
                last_ok = time.monotonic()
            silent = time.monotonic() - last_ok
            if silent > policy.health_deadline_s:
                what = self.probe.readiness.what
                return "frozen", f"has not answered its health check ({what}) for {silent:.0f} s"
        return None

    def _restart(self, kind: str, cause: str) -> bool:
        """Kills what is left of the child and starts it again, after the back-off, until it is
        ready; False when stopping or when the restart limit is reached (then it gave up)."""
        child, policy, supervisor = self.child, self.policy, self.supervisor
        while True:
            child.kill()  # a frozen child, and whatever a dead one left holding its resources
            child.drain()
            self.probe.forget()
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > policy.window_s:
                self.restarts.popleft()
            if len(self.restarts) >= policy.max_restarts:
                supervisor.give_up(
                    f"{child.name} {cause}, after {len(self.restarts)} restarts within "
                    f"{policy.window_s:.0f} s; giving up, so everything stops; last lines of "
                    f"{child.log_path}:\n{quoted_tail(child)}"
                )
                return False
            number = len(self.restarts) + 1
            delay = policy.backoff(number)
            supervisor.say(
                f"{child.name} {cause}; restarting it in {delay:.0f} s (restart {number} of at "
                f"most {policy.max_restarts} within {policy.window_s:.0f} s); last lines of "
                f"{child.log_path}:\n{quoted_tail(child)}"
            )
            if supervisor.stopping.wait(delay):
                return False
            self.restarts.append(time.monotonic())
            supervisor.count_restart(child, kind)
            began = time.monotonic()
            child.start(note=f"restart {number}: {child.name} {cause}")
            failure = self._wait_until_ready(began)
            if failure is None:
                if supervisor.stopping.is_set():
                    return False
                supervisor.say(f"{child.name} is back after {time.monotonic() - began:.1f} s")
                supervisor.notify(ChildEvent(child, up=True))
                return True
            kind, cause = failure

    def _wait_until_ready(self, began: float) -> tuple[str, str] | None:
        """None once the restarted child is ready (or stopping), else why it is not."""
        child, timeout = self.child, self.policy.ready_timeout_s
        while not self.supervisor.stopping.is_set():
            if self.probe.poll(POLL_S) is True:
                return None
            if child.returncode is not None:
                kind, how, cause = how_it_ended(child)
                return kind, f"{how} before it was ready again{cause}"
            if time.monotonic() - began > timeout:
                return "not_ready", f"was not ready within {timeout:.0f} s of its restart"
            time.sleep(POLL_S / 5)
        return None


class RestartCollector(Collector):
    """`/metrics` lines for the supervised children: restarts by cause, and which are up."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        """Restarts by component and cause, and which components are up, as of this scrape."""
        restarts = CounterMetricFamily(
            "splitwise_component_restarts",
            "Restarts of a component by the supervisor, by cause (killed, exited, unhealthy, "
            "frozen, not_ready)",
            labels=["component", "cause"],
        )
        up = GaugeMetricFamily(
            "splitwise_component_up", "1 while a component is serving", labels=["component"]
        )
        counts, states = self._supervisor.restart_counts()
        for (name, cause), count in sorted(counts.items()):
            restarts.add_metric([name, cause], count)
        for name, serving in sorted(states.items()):
            up.add_metric([name], float(serving))
        yield from (restarts, up)


class Supervisor:
    """Owns the launcher's children from start to stop."""

    def __init__(self, console: Console, run: str, stop_grace: float = 15.0) -> None:
        self.console = console
        self.run = run
        self.stop_grace = stop_grace
        self.stages: list[list[Child]] = []
        self.readiness: dict[Child, Readiness] = {}
        self.stopping = threading.Event()
        self.failure: str | None = None
        self.failed = threading.Event()
        self._hurry = threading.Event()
        self._watches: list[Watch] = []
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._restarts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._up: dict[str, bool] = {}

    @property
    def children(self) -> list[Child]:
        """Every child of every stage, in start order."""
        return [child for stage in self.stages for child in stage]

    def say(self, text: str) -> None:
        """One launcher line on the console."""
        self.console.say(LAUNCHER, text)

    def start_stage(self, members: Sequence[tuple[Child, Readiness]], timeout: float) -> None:
        """Starts the children of one stage together and returns once all of them are ready."""
        stage: list[Child] = []
        self.stages.append(stage)
        for child, readiness in members:
            self.say(f"starting {child.name} (log: {child.log_path})")
            child.start()
            stage.append(child)
            self.readiness[child] = readiness
        began = time.monotonic()
        waiting = dict(members)
        next_progress = began + PROGRESS_EVERY_S
        while waiting:
            for child, readiness in list(waiting.items()):
                if readiness.ready():
                    self.say(f"{child.name} ready after {time.monotonic() - began:.1f} s")
                    del waiting[child]
                    self._up[child.name] = True
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

    # -- while serving -----------------------------------------------------------------------

    def supervise(self, policy: RestartPolicy) -> None:
        """Watches every started child by `policy` until `stop_all`; `failed` is set (and
        `failure` says why) when the policy gives up."""
        for child in self.children:
            watch = Watch(self, child, self.readiness[child], policy)
            self._watches.append(watch)
            watch.thread.start()

    def listen(self, listener: Listener) -> None:
        """Calls `listener` (from a watcher thread) on every death and every return."""
        self._listeners.append(listener)

    def notify(self, event: ChildEvent) -> None:
        """Records the child's state and tells every listener (the proxy); a listener's failure is
        logged, never fatal."""
        with self._lock:
            self._up[event.child.name] = event.up
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # a listener's bug must not stop the supervision
                self.console.error(LAUNCHER, f"while telling of {event.child.name}: {exc!r}")

    def give_up(self, message: str) -> None:
        """Stops the supervision with `message` as the cause (the first one given wins)."""
        if not self.failed.is_set():
            self.failure = message
            self.failed.set()

    def count_restart(self, child: Child, cause: str) -> None:
        """One more restart of `child` for `cause`, for /metrics."""
        with self._lock:
            self._restarts[child.name, cause] += 1

    def restart_counts(self) -> tuple[dict[tuple[str, str], int], dict[str, bool]]:
        """Restarts by (child, cause) and each child's state, as of now."""
        with self._lock:
            return dict(self._restarts), dict(self._up)

    def collector(self) -> Collector:
        """The restart counts and states as a Prometheus collector for the proxy's registry."""
        return RestartCollector(self)

    # -- stopping ----------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Stops the watchers, then the stages newest first; a second Ctrl-C or SIGTERM skips
        the grace periods."""
        self.stopping.set()
        for watch in self._watches:
            watch.thread.join(10.0)  # a restart in progress notices within a poll
        self._watches.clear()
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
