"""The whole system as a user starts it (`python -m splitwise_local serve ...`): the one way the
tests, the benchmarks and the experiment launch it.

`Launch` runs the launcher as a child with its console in two files beside the run folder,
waits for lines on it, and stops it with SIGTERM as Ctrl-C would. Every process of the run,
however deep or reparented, carries the run's tag and its component's name in its environment
(serve/process.py), so faults can be aimed at one component and leftovers found afterwards.
`launch_system` starts one on fresh ports; `Running` reads its metrics and finds its parts.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import psutil

from splitwise_local.config import load_config
from splitwise_local.serve.ports import free_ports
from splitwise_local.serve.process import PARENT_DEATH_SIGNAL, dies_with_parent, tagged
from splitwise_local.store.backend import KVBackend, open_backend
from splitwise_testing.scrape import read_page, total, value


def _as_from_a_terminal() -> None:
    """SIGINT at its default in the launcher, as a user's shell starts it: a process run as a
    background job (CI, `cmd &`) starts with SIGINT ignored, children inherit that, and the
    launcher rightly leaves an ignored signal ignored (nohup semantics). And the launcher dies
    with whoever started it (a test run killed with -9), taking its children with it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _ARM_PARENT_DEATH is not None:
        _ARM_PARENT_DEATH()


_ARM_PARENT_DEATH = dies_with_parent(PARENT_DEATH_SIGNAL)


class LaunchFailed(RuntimeError):
    """The launcher exited, or never printed what was waited for; the message has its output."""


class Launch:
    """`python -m splitwise_local serve ARGS` as a user runs it, its stdout and stderr in files
    beside `run_dir`; `python` is the interpreter (a stand-in in the experiment's test)."""

    def __init__(
        self,
        args: list[str],
        run_dir: Path,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)  # `runs/` on a fresh clone
        self.out_path = run_dir.parent / f"{run_dir.name}.stdout"
        self.err_path = run_dir.parent / f"{run_dir.name}.stderr"
        command = [python, "-m", "splitwise_local", "serve", *args, "--run-dir", str(run_dir)]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                env=env,
                stdin=subprocess.DEVNULL,
                preexec_fn=_as_from_a_terminal,
            )

    def _fail(self, reason: str) -> NoReturn:
        """Raises LaunchFailed: `reason` on the first line, then everything the launcher said."""
        raise LaunchFailed(f"{reason}\nstdout:\n{self.out}\nstderr:\n{self.err}")

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, after: int = 0) -> int:
        """Waits until `text` is on stdout (from character `after` on) and returns where it ends;
        raises LaunchFailed with the output if the launcher exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while (found := self.out.find(text, after)) < 0:
            if (code := self.popen.poll()) is not None:
                self._fail(f"the launcher exited with code {code} before printing {text!r}")
            if time.monotonic() > deadline:
                self._fail(f"the launcher printed no {text!r} in {timeout:.0f} s")
            time.sleep(0.2)
        return found + len(text)

    def finish(self, sig: int | None = None, timeout: float = 60.0) -> int:
        """Sends `sig` (if any) and returns the exit code."""
        if sig is not None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)

    def child(self, marker: str) -> psutil.Process:
        """The launcher's direct child whose command line contains `marker`."""
        for process in psutil.Process(self.popen.pid).children():
            if marker in " ".join(process.cmdline()):
                return process
        raise LaunchFailed(f"no child of the launcher runs {marker!r}")

    def processes(self, component: str | None = None) -> list[psutil.Process]:
        """The live processes of the run, or of one component ("decode engine", "store")."""
        return tagged(str(self.run_dir), component)

    def stop(self) -> None:
        """SIGTERM if still running; the caller then checks `leftovers`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(120)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def leftovers(run_dir: Path) -> list[str]:
    """Processes of that run still alive, as readable strings (empty when all are gone)."""
    deadline = time.monotonic() + 2.0  # a SIGKILLed process may need a moment to vanish
    while (found := tagged(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p.pid} {' '.join(p.cmdline())}" for p in found]


def open_store(run_dir: Path) -> KVBackend:
    """A client of the run's store, configured from the `splitwise.yaml` the launcher wrote
    into the run folder (the engines' own config: URL, auth token, backend settings)."""
    config = load_config(run_dir / "splitwise.yaml")
    return open_backend(config.remote_url, config)


def sweep(run_dir: Path) -> None:
    """Kills whatever a failed run left, so one failure does not starve the rest."""
    for process in tagged(str(run_dir)):
        process.kill()


@dataclass
class Running:
    """A launched system and what the faults need to reach its parts."""

    launch: Launch
    url: str
    model: str
    ports: dict[str, int]  # component -> port ("decode engine" -> 8020)

    def up(self, component: str) -> float | None:
        """The proxy's `splitwise_component_up` for it; None before the supervisor reports it."""
        return value(self.url, "splitwise_component_up", component=component)

    def restarts(self, component: str) -> float:
        """Its restarts so far, whatever their cause."""
        return total(self.url, "splitwise_component_restarts_total", component=component)

    def state(self, component: str) -> tuple[float | None, float]:
        """`up` and `restarts` from one scrape: the supervisor marks a component down before it
        counts its restart, so one page never shows a restart with the dead process still up
        (two scrapes a busy second apart can)."""
        page = read_page(self.url)
        up = value(page, "splitwise_component_up", component=component)
        return up, total(page, "splitwise_component_restarts_total", component=component)

    def external_hits(self) -> float:
        """Prompt tokens the decode engine has loaded from the store so far."""
        decode = f"http://127.0.0.1:{self.ports['decode engine']}"
        return total(decode, "vllm:external_prefix_cache_hits_total")

    def main_process(self, component: str) -> psutil.Process:
        """The component's process the launcher started (not one of its helpers)."""
        for process in self.launch.processes(component):
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.ppid() == self.launch.popen.pid:
                    return process
        raise RuntimeError(f"no running {component}")

    def engine_core(self, component: str) -> psutil.Process:
        """The EngineCore process under an engine's API server."""
        for process in self.main_process(component).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "EngineCore" in process.name() or "EngineCore" in " ".join(process.cmdline()):
                    return process
        raise RuntimeError(f"no EngineCore process under the {component}")

    def cold_starts(self) -> dict[str, float]:
        """Seconds each component took to become ready at launch, from the launcher's lines."""
        starts = {}
        for line in self.launch.out.splitlines():
            head, sep, tail = line.removeprefix("[launcher] ").partition(" ready after ")
            if sep:
                with contextlib.suppress(ValueError):
                    starts[head] = float(tail.split()[0])
        return starts


def launch_system(
    run_dir: Path,
    health_deadline_s: float | None = None,
    extra: list[str] | None = None,
    timeout: float = 900,
    *,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
) -> Running:
    """Starts the whole system on fresh ports with `extra` launcher flags and waits until it is
    ready (raises LaunchFailed, with the launcher's output, if it never is)."""
    proxy, prefill, decode, store, store_metrics = free_ports(5)
    args = ["--port", str(proxy), "--prefill-port", str(prefill), "--decode-port", str(decode)]
    args += ["--store-port", str(store), "--store-metrics-port", str(store_metrics)]
    if health_deadline_s is not None:
        args += ["--health-deadline", str(health_deadline_s)]
    launch = Launch([*args, *(extra or [])], run_dir, env, python)
    try:
        launch.wait_for("ready: http://", timeout)
        url = f"http://127.0.0.1:{proxy}"
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    except BaseException:
        launch.stop()
        sweep(run_dir)
        raise
    ports = {"proxy": proxy, "prefill engine": prefill, "decode engine": decode, "store": store}
    ports["store metrics"] = store_metrics
    return Running(launch, url, model, ports)
