"""The system a launch starts, built from its plans (plan.py): the run folder, the per-run config,
and each component as a supervised child with its command, environment, log and readiness.

`System` is everything `launcher.run` hands to the supervisor and the proxy, and what the ready
banner describes.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from splitwise_local.config import SplitwiseConfig, dump_config
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.serve.console import Console
from splitwise_local.serve.mooncake_master import launcher_member
from splitwise_local.serve.plan import LOOPBACK, EnginePlan, StorePlan
from splitwise_local.serve.probes import engine_healthy, http_ok, store_responds
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.prometheus import (
    PrometheusMissing,
    ScrapeTarget,
    prometheus_child,
    ready_url,
)
from splitwise_local.serve.settings import LaunchError, LaunchSettings
from splitwise_local.serve.supervisor import Readiness

Member = tuple[Child, Readiness]  # what the supervisor starts, and how it knows it is ready


@dataclass(frozen=True)
class EngineMember:
    """One planned engine as a child of the launcher."""

    plan: EnginePlan
    child: Child
    readiness: Readiness

    @property
    def url(self) -> str:
        """The engine's base URL."""
        return self.plan.spec.url


@dataclass(frozen=True)
class System:
    """Everything a launch starts and serves, in the order the supervisor starts it."""

    run_dir: Path
    prometheus: Member | None  # first in, last out: it sees the whole run
    store: Member | None
    engines: list[EngineMember]
    proxy: ProxySettings
    proxy_url: str
    proxy_socket: socket.socket  # bound before anything starts, so no one takes the port
    served_model: str
    dtype_line: str | None = None  # the engines' dtype and why, for the ready banner
    prometheus_url: str | None = None


def pick_run_dir(requested: str | None) -> Path:
    """The run folder: the one asked for (made if need be), else a new `runs/<time>[-N]`."""
    if requested:
        run_dir = Path(requested)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ["", *(f"-{n}" for n in range(1, 100))]:
        run_dir = Path("runs") / (stamp + suffix)
        try:
            run_dir.mkdir(parents=True)
            return run_dir.resolve()
        except FileExistsError:
            continue
    raise LaunchError(f"cannot create a run folder under runs/{stamp}*")


def child_env(base: Mapping[str, str], run_dir: Path) -> dict[str, str]:
    """A child's environment: the run's tag (leftovers are found by it) and unbuffered output,
    so its log lines arrive as they are written."""
    return {**base, RUN_ENV: str(run_dir), "PYTHONUNBUFFERED": "1"}


def store_member(
    config: SplitwiseConfig, store: StorePlan, run_dir: Path, console: Console
) -> tuple[Member, Path]:
    """The store's child, and the per-run config (`splitwise.yaml`) that points the engines at
    it: our store's shared memory, or the Mooncake master."""
    if store.kind == "mooncake":
        env = child_env(os.environ, run_dir)
        try:
            return launcher_member(config, store.port, run_dir, env, console)
        except FileNotFoundError as exc:
            raise LaunchError(f"Mooncake is not installed ({exc}): run scripts/setup.sh") from None
    assert store.shm_url is not None and store.metrics_port is not None
    engines_config = config.model_copy(update={"remote_url": store.shm_url})
    config_file = dump_config(engines_config, run_dir / "splitwise.yaml")
    # The store reads its capacity and auth token from the same file: no secret in `ps`.
    command = [sys.executable, "-m", "splitwise_local", "store", "--host", LOOPBACK]
    command += ["--port", str(store.port), "--shm-name", store.shm_url.removeprefix("shm://")]
    command += ["--metrics-port", str(store.metrics_port), "--config", str(config_file)]
    env = child_env(os.environ, run_dir)
    child = Child("store", command, env, run_dir / "store.log", console)
    url = store.shm_url
    ready = Readiness(lambda: store_responds(url, engines_config), f"stats() on {url}")
    return (child, ready), config_file


def engine_member(plan: EnginePlan, run_dir: Path, console: Console) -> EngineMember:
    """The engine's child: its vLLM command, environment, log and readiness (vLLM's /health)."""
    env = {**child_env(plan.spec.environment(), run_dir), **plan.env}
    child = Child(plan.name, plan.spec.command(), env, run_dir / plan.log_name, console)
    health = f"{plan.spec.url}/health"
    return EngineMember(plan, child, Readiness(lambda: engine_healthy(health), f"GET {health}"))


def prometheus_member(
    settings: LaunchSettings,
    proxy_url: str,
    engines: Sequence[EngineMember],
    store: StorePlan | None,
    run_dir: Path,
    console: Console,
) -> Member:
    """Prometheus, scraping the proxy, every engine (labelled with its role) and our store."""
    targets = [ScrapeTarget("proxy", proxy_url.removeprefix("http://"))]
    targets += [
        ScrapeTarget(
            "engine",
            engine.url.removeprefix("http://"),
            {"role": engine.plan.role, "component": engine.plan.name},
        )
        for engine in engines
    ]
    if store is not None and store.metrics_port is not None:
        targets.append(ScrapeTarget("store", f"{LOOPBACK}:{store.metrics_port}"))
    env = child_env(os.environ, run_dir)
    port = settings.prometheus_port
    try:
        child = prometheus_child(targets, port, settings.scrape_interval, run_dir, env, console)
    except PrometheusMissing as exc:
        raise LaunchError(str(exc)) from None
    ready = ready_url(port)
    return child, Readiness(lambda: http_ok(ready), f"GET {ready}")
