"""`bench chaos`: what callers see when a component dies or freezes under load, and how long the
system takes to heal by itself.

It starts the whole system as a user does (`python -m splitwise_local`, real engines, the
default `--restart on-failure`), keeps `--callers` streaming requests running (closed loop: each
caller sends its next request when the last one ends), and injects one fault after another:
kill -9 of the store, of a prefill engine, of a decode engine, of a decode engine's EngineCore
process, and freezes (SIGSTOP of a component's process group for longer than the health
deadline, then SIGCONT). For each fault it reports the requests that could have been hit (in
flight at the fault, or sent before the system noticed it: those reached a dying component) and
how many of them failed, whether every failure reached its caller as an OpenAI-format error (an
error answer, or an error event followed by `[DONE]`), failures among requests sent once the
system had noticed (the proxy knew: none may fail), seconds until a request sent after the
fault succeeded,
seconds until the component served again, processes left over from the dead one, and for the
store its state after the restart (a restarted store is empty: a key written before the fault
is gone) and whether the decode engine's external hits resumed. Ratios: each recovery against
the same component's cold start in the same run.

The chaos suite (tests/chaos/) runs the same faults, shorter, and asserts on these records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from splitwise_bench import report
from splitwise_testing.launch import Running, launch_system, leftovers, open_store, sweep

SENTINEL_KEY = "c0" * 32  # written before a store fault, looked for after its restart
POLL_S = 0.25


@dataclass(frozen=True)
class Fault:
    """One fault: which component, and what is done to it."""

    name: str
    component: str  # as the launcher names it: "store", "prefill engine", "decode engine"
    action: str  # kill (SIGKILL the component), kill-core (its EngineCore), freeze (SIGSTOP)


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault("store-kill", "store", "kill"),
        Fault("store-freeze", "store", "freeze"),
        Fault("prefill-kill", "prefill engine", "kill"),
        Fault("decode-kill", "decode engine", "kill"),
        Fault("decode-core-kill", "decode engine", "kill-core"),
        Fault("prefill-core-kill", "prefill engine", "kill-core"),
        Fault("decode-freeze", "decode engine", "freeze"),
    )
}
CI_FAULTS = ("store-kill", "store-freeze", "prefill-kill", "decode-kill", "decode-core-kill")


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Call:
    """One streamed request as its caller saw it; times are `time.monotonic()` values."""

    sent: float
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    ok: bool = False
    clean: bool = True  # a failure the caller can parse: OpenAI error JSON, or event + [DONE]
    error: str | None = None


def openai_error(payload: Any) -> bool:
    """Whether `payload` is OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    error = payload.get("error") if isinstance(payload, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
    )


def prompts(count: int, words: int = 120) -> list[str]:
    """`count` different windows of the shipped prose, `words` words each."""
    text = resources.files("splitwise_local.data").joinpath("prose.txt").read_text().split()
    step = max(1, (len(text) - words) // max(count, 1))
    return [" ".join(text[i * step : i * step + words]) for i in range(count)]


class Load:
    """`callers` closed-loop callers streaming `/v1/completions` through the proxy, in a thread
    with its own event loop, until `stop()`."""

    def __init__(
        self, url: str, model: str, callers: int, max_tokens: int, timeout_s: float
    ) -> None:
        self.url = url
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.prompts = prompts(callers)
        self.calls: list[Call] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Lets every caller finish its request in flight, then returns."""
        self._stopping.set()
        self._thread.join(self.timeout_s + 30)

    def since(self, moment: float) -> list[Call]:
        return [call for call in self.calls if call.sent >= moment]

    def summary(self) -> dict[str, int]:
        """Every call so far: answered, failed, failed uncleanly, and still without an end
        (after `stop()`, a call that never ended hung past its timeout)."""
        ended = [call for call in self.calls if call.ended is not None]
        return {
            "calls": len(self.calls),
            "ok": sum(call.ok for call in ended),
            "failed": sum(not call.ok for call in ended),
            "unclean": sum(not call.ok and not call.clean for call in ended),
            "unended": len(self.calls) - len(ended),
        }

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await asyncio.gather(*(self._caller(client, prompt) for prompt in self.prompts))

    async def _caller(self, client: httpx.AsyncClient, prompt: str) -> None:
        while not self._stopping.is_set():
            call = Call(sent=time.monotonic())
            self.calls.append(call)
            await self._send(client, prompt, call)
            call.ended = time.monotonic()
            if not call.ok:
                await asyncio.sleep(0.5)  # as a client would before retrying

    async def _send(self, client: httpx.AsyncClient, prompt: str, call: Call) -> None:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with client.stream("POST", self.url + "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    content = await answer.aread()
                    call.error = f"HTTP {answer.status_code}: {content[:200]!r}"
                    call.clean = _parses_as_openai_error(content)
                    return
                await self._read_stream(answer, call)
        except httpx.TimeoutException as exc:
            call.error, call.clean = f"no answer within {self.timeout_s:.0f} s: {exc!r}", False
        except httpx.HTTPError as exc:
            call.error, call.clean = f"{type(exc).__name__}: {exc}", False

    @staticmethod
    async def _read_stream(answer: httpx.Response, call: Call) -> None:
        done = False
        async for line in answer.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                call.error = f"error event: {event['error']}"
                call.clean = openai_error(event)
                continue
            if any(choice.get("text") for choice in event.get("choices") or []):
                call.tokens += 1
                call.first_token = call.first_token or time.monotonic()
        if call.error is not None:
            call.clean = call.clean and done  # an error event must be followed by [DONE]
        elif not done:
            call.error, call.clean = "the stream ended without [DONE]", False
        else:
            call.ok = call.tokens > 0


def _parses_as_openai_error(content: bytes) -> bool:
    try:
        return openai_error(json.loads(content))
    except ValueError:
        return False


# -- one fault --------------------------------------------------------------------------------


@dataclass
class FaultResult:
    """What one fault did to callers and how the system healed; seconds from the fault."""

    fault: str
    in_flight: int = 0  # in flight at the fault, or sent before the system noticed it
    failed_in_flight: int = 0
    sent_after: int = 0  # sent once the system had noticed, ended within the window
    failed_after: int = 0
    unclean: int = 0
    first_success_s: float | None = None
    noticed_s: float | None = None
    back_s: float | None = None
    restarts: int = 0
    others_restarted: dict[str, int] = field(default_factory=dict)  # the other components'
    processes_before: int = 0
    processes_after: int = 0
    store_empty_after_restart: bool | None = None
    store_items_after_restart: int | None = None
    hits_resumed: bool | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def orphans(self) -> int:
        """Processes of the component beyond what it had before the fault."""
        return max(0, self.processes_after - self.processes_before)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "orphans": self.orphans}


def inject(system: Running, fault: Fault) -> Callable[[], None]:
    """Does the fault now; returns what undoes it, if anything (SIGCONT after a freeze)."""
    target = system.main_process(fault.component)
    if fault.action == "kill":
        target.kill()
    elif fault.action == "kill-core":
        system.engine_core(fault.component).kill()
    elif fault.action == "freeze":
        group = os.getpgid(target.pid)
        os.killpg(group, signal.SIGSTOP)

        def thaw() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)

        return thaw
    else:
        raise ValueError(f"unknown fault action {fault.action!r}")
    return lambda: None


def put_sentinel(system: Running) -> Any:
    """A store client holding one key written now; None if the store cannot be reached."""
    store = open_store(system.launch.run_dir)
    store.put(SENTINEL_KEY, b"written before the fault")
    return store


def run_fault(
    system: Running,
    load: Load,
    fault: Fault,
    freeze_s: float,
    recovery_timeout_s: float,
    settle_s: float = 5.0,
) -> FaultResult:
    """Injects `fault` under `load`, waits until the component is back and a request sent after
    the fault has succeeded, lets the load run `settle_s` more (and on until a request sent
    after the system noticed has ended), and measures."""
    result = FaultResult(fault.name)
    others = sorted({f.component for f in FAULTS.values()} - {fault.component})
    before = {c: system.restarts(c) for c in (fault.component, *others)}
    result.processes_before = len(system.launch.processes(fault.component))
    store = put_sentinel(system) if fault.component == "store" else None
    time.sleep(2.0)  # every caller has a request in flight
    began = time.monotonic()
    deadline = began + recovery_timeout_s
    thaw_at = began + (freeze_s if fault.action == "freeze" else 0.0)
    hits_at_back = _recover(
        system, load, fault, result, store,
        began=began, thaw_at=thaw_at, deadline=deadline, restarts_before=before[fault.component],
    )  # fmt: skip
    _settle(load, result, began, settle_s, deadline)
    if store is not None:
        if result.back_s is not None:
            result.hits_resumed = system.external_hits() > hits_at_back
        store.close()
    ended = time.monotonic()
    # Prometheus counts in floats; restarts are whole, and compared as such.
    result.restarts = round(system.restarts(fault.component) - before[fault.component])
    result.others_restarted = {c: round(system.restarts(c) - before[c]) for c in others}
    result.processes_after = len(system.launch.processes(fault.component))
    _judge_calls(result, load, began, ended)
    return result


def _recover(
    system: Running,
    load: Load,
    fault: Fault,
    result: FaultResult,
    store: Any,
    *,
    began: float,
    thaw_at: float,
    deadline: float,
    restarts_before: float,
) -> float:
    """Injects the fault and polls until the component is back and a request sent since has
    succeeded (a frozen one thawed on the way); notes when each happened in `result`. Returns
    the decode engine's external hits when the store came back (0 for other faults)."""
    hits_at_back = 0.0
    thaw: Callable[[], None] | None = inject(system, fault)
    while time.monotonic() < deadline:
        now = time.monotonic()
        if thaw is not None and now >= thaw_at:
            thaw()  # SIGCONT: by now the supervisor should have replaced the frozen process
            thaw = None
        up, restarted = system.state(fault.component)
        if result.noticed_s is None and (up == 0 or restarted > restarts_before):
            result.noticed_s = now - began
        if result.back_s is None and restarted > restarts_before and up:
            result.back_s = now - began
            if store is not None:
                result.store_items_after_restart = int(store.stats()["items"])
                result.store_empty_after_restart = store.get(SENTINEL_KEY) is None
                hits_at_back = system.external_hits()
        succeeded = [c for c in load.since(began) if c.ok]
        if thaw is None and result.back_s is not None and succeeded:
            break
        time.sleep(POLL_S)
    return hits_at_back


def _settle(load: Load, result: FaultResult, began: float, settle_s: float, deadline: float):
    """Lets the load run `settle_s` more and (however slow this CPU) until a request sent after
    the notice has ended: what happens to those is what the fault is judged on."""
    settled = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        noticed_at = began + (result.noticed_s if result.noticed_s is not None else 0.0)
        ended_after = any(c.ended is not None for c in load.since(noticed_at))
        if time.monotonic() >= settled and ended_after:
            break
        time.sleep(POLL_S)


def _judge_calls(result: FaultResult, load: Load, began: float, ended: float) -> None:
    """The calls the fault could hit (in flight, or sent before it was noticed), those sent
    after, and how each failed."""
    noticed = began + (result.noticed_s if result.noticed_s is not None else ended - began)
    hit = [c for c in load.calls if c.sent < noticed and (c.ended is None or c.ended > began)]
    after = [c for c in load.since(noticed) if c.ended is not None and c.ended <= ended]
    successes = [c.ended - began for c in load.since(began) if c.ok and c.ended is not None]
    result.in_flight = len(hit)
    result.failed_in_flight = sum(not c.ok for c in hit if c.ended is not None)
    result.sent_after = len(after)
    result.failed_after = sum(not c.ok for c in after)
    failures = [c for c in (*hit, *after) if c.ended is not None and not c.ok]
    result.unclean = sum(not c.clean for c in failures)
    result.first_success_s = min(successes) if successes else None
    result.errors = sorted({c.error or "" for c in failures})[:10]


# -- the benchmark ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default: all of {', '.join(FAULTS)})",
    )
    parser.add_argument("--callers", type=int, default=8, help="concurrent streaming requests")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument(
        "--health-deadline", type=float, default=10.0, help="the launcher's --health-deadline"
    )
    parser.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS")
    parser.add_argument("--run-dir", default="runs/bench-chaos", help="the system's run folder")


def freeze_time(health_deadline_s: float) -> float:
    """How long a freeze lasts: past the deadline and the health check that sees it."""
    return health_deadline_s + 5.0


def run_chaos(
    system: Running,
    faults: list[Fault],
    callers: int,
    max_tokens: int,
    health_deadline_s: float,
    request_timeout_s: float,
) -> tuple[list[FaultResult], dict[str, int]]:
    """Every fault in turn under one load, and the load's summary; the system keeps running."""
    load = Load(system.url, system.model, callers, max_tokens, request_timeout_s).start()
    try:
        results = []
        for fault in faults:
            print(f"bench chaos: {fault.name} ...", flush=True)
            result = run_fault(system, load, fault, freeze_time(health_deadline_s), 900.0)
            results.append(result)
            print(f"bench chaos: {fault.name}: {result.as_dict()}", flush=True)
    finally:
        load.stop()
    return results, load.summary()


def run(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULTS]
    if unknown:
        print(f"bench chaos: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
        return 2
    run_dir = Path(args.run_dir).resolve()
    system = launch_system(run_dir, args.health_deadline)
    try:
        cold = system.cold_starts()
        results, calls = run_chaos(
            system,
            [FAULTS[n] for n in names],
            args.callers,
            args.max_tokens,
            args.health_deadline,
            args.request_timeout,
        )
    finally:
        system.launch.stop()
        left = leftovers(run_dir)
        sweep(run_dir)
    print_results(args, results)
    print(f"calls: {calls}; cold starts: {cold}; processes left after the stop: {len(left)}")
    ratios = {}
    for fault, result in zip([FAULTS[n] for n in names], results, strict=True):
        if result.back_s is not None and cold.get(fault.component):
            ratios[f"{fault.name}_recovery_vs_cold_start"] = result.back_s / cold[fault.component]
        if result.in_flight:
            ratios[f"{fault.name}_failed_in_flight"] = result.failed_in_flight / result.in_flight
    report.write_json(
        args.json,
        {
            "benchmark": "chaos",
            "settings": {
                "callers": args.callers,
                "max_tokens": args.max_tokens,
                "health_deadline_s": args.health_deadline,
                "faults": names,
            },
            "cold_start_s": cold,
            "faults": [r.as_dict() for r in results],
            "calls": calls,
            "leftover_processes": left,
            "ratios": ratios,
        },
    )
    clean = all(r.unclean == 0 and r.failed_after == 0 and r.back_s for r in results)
    return 0 if clean and not left and calls["unclean"] == calls["unended"] == 0 else 1


def print_results(args: argparse.Namespace, results: list[FaultResult]) -> None:
    rows = [
        [r.fault, f"{r.failed_in_flight}/{r.in_flight}", f"{r.failed_after}/{r.sent_after}",
         "yes" if r.unclean == 0 else f"no ({r.unclean})", r.first_success_s, r.back_s,
         r.orphans, "-" if r.store_empty_after_restart is None else r.store_empty_after_restart]
        for r in results
    ]  # fmt: skip
    report.print_table(
        f"bench chaos: {args.callers} streaming callers, health deadline {args.health_deadline} s",
        ["fault", "failed/in flight", "failed/sent after", "clean", "next success s", "back s",
         "orphans", "store empty"],
        rows,
    )  # fmt: skip
