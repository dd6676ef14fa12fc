"""The four systems of the experiment, started one at a time on the same cores, behind a proxy.

- **colocated**: one plain vLLM engine on every core (vLLM's own prefix caching on, no
  connector), behind the proxy (`--disagg never`);
- **dp**: one plain engine per half of the cores, behind the same proxy (least loaded): the
  data-parallel baseline Splitwise and DistServe compare against;
- **1p1d**: `python -m splitwise_local --disagg always`: a prefill and a decode engine on half
  the cores each, KV through the store;
- **auto**: the same with `--disagg auto` and the ITL objective the ITL-bound SLO sets;
  `admission=True` also turns the proxy's admission control on.

The plain engines run as children of a supervisor here; 1p1d and auto start through the
launcher exactly as users and the tests start it (`splitwise_testing.launch`). Every process
runs where it lands by default (the load generator and proxy on any core; each engine's compute
threads bound to its cores by vLLM), the same for every system.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from splitwise_local.serve.console import Console
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.probes import http_ok
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.supervisor import Readiness, StartupError, Supervisor
from splitwise_testing import launch

START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Engine:
    name: str
    port: int
    cores: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Running:
    """One started system: where to send requests and what to read around a run."""

    name: str
    description: str
    proxy_port: int
    engines: list[Engine]
    store_url: str | None = None
    pids: list[int] = field(default_factory=list)  # whose CPU is the system's own

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def metrics(self) -> dict[str, str]:
        """Each component's /metrics page, by name (the engines' and the proxy's)."""
        return {e.name: f"{e.url}/metrics" for e in self.engines} | {"proxy": f"{self.url}/metrics"}


@dataclass(frozen=True)
class Launcher:
    """How to start any system: the interpreter, the model, the cores and the shared flags."""

    python: str
    model: str | None
    cores: tuple[int, ...]
    kv_cache_gb: int
    store_config: Path  # the store's and connectors' YAML (chunk size, capacity)
    itl_objective_ms: float

    def env(self, root: Path) -> dict[str, str]:
        env = dict(os.environ)
        env[RUN_ENV] = str(root)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gb)
        return env

    def model_args(self) -> list[str]:
        return ["--model", self.model] if self.model else []

    def halves(self) -> tuple[str, str]:
        half = max(len(self.cores) // 2, 1)
        first, second = self.cores[:half], self.cores[half:] or self.cores
        return ",".join(map(str, first)), ",".join(map(str, second))

    @contextlib.contextmanager
    def system(self, name: str, root: Path, admission: bool = False) -> Iterator[Running]:
        """Starts `name`, yields it running, stops it (raises StartupError if it never runs)."""
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stops:
            if name in ("colocated", "dp"):
                yield self._plain(name, root, stops)
            else:
                yield self._launched(name, root, stops, admission)

    def _plain(self, name: str, root: Path, stops: contextlib.ExitStack) -> Running:
        """Plain engines and a proxy in front of them, children of a supervisor."""
        supervisor = Supervisor(Console("error"), run=str(root), stop_grace=30)
        stops.callback(supervisor.stop_all)
        every = ",".join(map(str, self.cores))
        groups = [every] if name == "colocated" else list(self.halves())
        engines = [Engine(f"engine{i}", free_port(), cores) for i, cores in enumerate(groups)]
        members = []
        for e in engines:
            args = ["engine", "--role", "plain", "--port", str(e.port), "--cpu-cores", e.cores]
            args += [*self.model_args(), "--", "--enable-prefix-caching"]
            ready = Readiness(lambda u=e.url: http_ok(f"{u}/health", timeout=5), "/health")
            members.append((self._child(supervisor, e.name, args, root), ready))
        supervisor.start_stage(members, START_TIMEOUT_S)
        port = free_port()
        decode = ",".join(e.url for e in engines)
        args = ["proxy", "--decode", decode, "--disagg", "never", "--port", str(port)]
        proxy = self._child(supervisor, "proxy", args, root)
        url = f"http://127.0.0.1:{port}"
        ready = Readiness(lambda: http_ok(f"{url}/v1/models", timeout=5), "/v1/models")
        supervisor.start_stage([(proxy, ready)], 120)
        where = " and ".join(f"cores {e.cores}" for e in engines)
        what = "one plain vLLM engine" if name == "colocated" else "plain vLLM engines"
        description = (
            f"{what} on {where} (vLLM's prefix caching on, no connector), behind the proxy "
            "(`proxy --disagg never`, least loaded)"
        )
        return Running(name, description, port, engines, pids=[proxy.pid or 0])

    def _child(self, supervisor: Supervisor, name: str, args: list[str], root: Path) -> Child:
        command = [self.python, "-m", "splitwise_local", *args]
        return Child(name, command, self.env(root), root / f"{name}.log", supervisor.console)

    def _launched(
        self, name: str, root: Path, stops: contextlib.ExitStack, admission: bool
    ) -> Running:
        """`python -m splitwise_local --disagg always|auto`, started as the tests start it."""
        mode = "always" if name == "1p1d" else "auto"
        flags = ["--log-level", "warning", "--disagg", mode, "--config", str(self.store_config)]
        flags += ["--kv-cache-gb", str(self.kv_cache_gb), *self.model_args()]
        if mode == "auto":
            flags += ["--itl-objective", f"{self.itl_objective_ms:g}"]
        if admission:
            flags.append("--admission")
        try:
            system = launch.launch_system(
                root / "system",
                extra=flags,
                timeout=START_TIMEOUT_S,
                env=self.env(root),
                python=self.python,
            )
        except launch.LaunchFailed as exc:  # its output is in root/system.stdout and .stderr
            raise StartupError(str(exc).splitlines()[0]) from None
        stops.callback(launch.sweep, system.launch.run_dir)
        stops.callback(system.launch.stop)
        prefill_cores, decode_cores = self.halves()
        engines = [
            Engine("prefill", system.ports["prefill engine"], prefill_cores),
            Engine("decode", system.ports["decode engine"], decode_cores),
        ]
        shown = [f for f in flags if f not in ("--log-level", "warning", "--config")]
        shown = [f for f in shown if f != str(self.store_config)]
        description = (
            f"`python -m splitwise_local {' '.join(shown)}` (store config: "
            f"{self.store_config.name}): store, prefill engine on cores {prefill_cores}, "
            f"decode engine on cores {decode_cores}, the proxy in the launcher"
        )
        store = f"lm://127.0.0.1:{system.ports['store']}"
        return Running(
            name, description, system.ports["proxy"], engines, store, pids=[system.launch.popen.pid]
        )
