"""A `mooncake_master` bound to loopback: the metadata service of a Mooncake Store.

Mooncake keeps values in memory segments that its clients (our engines) mount; the master only
records which key lives in which segment, grants read leases and evicts. Started here it
listens on two sockets, both on `host` (127.0.0.1 unless a multi-host setup asks otherwise):
the RPC port that `mooncakestore://HOST:PORT` names, and an HTTP metrics page that the
backend's `stats()` and the readiness check read. Its optional HTTP metadata server stays off
(it would bind every interface); clients find each other by P2P handshake instead.

`MasterSpec` is the command and the checks; `supervised_master` hands one to a `Supervisor` like
any other child, and `launcher_member` adds the engines' per-run config for `serve --store
mooncake`. Tests and benchmarks start one of their own with `splitwise_testing.mooncake_child`.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from splitwise_local.config import SplitwiseConfig, dump_config
from splitwise_local.serve.console import Console
from splitwise_local.serve.ports import free_port, free_ports
from splitwise_local.serve.process import Child
from splitwise_local.serve.supervisor import Readiness

DEFAULT_LEASE_MS = 10_000  # Mooncake's default: a value being read cannot be removed this long


def master_binary() -> str:
    """The `mooncake_master` executable shipped inside the `mooncake` Python package."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mooncake_master not found: install mooncake-transfer-engine-non-cuda "
            "(scripts/setup.sh does)"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "mooncake_master"
    if not binary.is_file():
        raise FileNotFoundError(f"mooncake_master not found at {binary}")
    return str(binary)


@dataclass(frozen=True)
class MasterSpec:
    """One master's addresses and settings; `url` is what engines put in `remote_url`."""

    port: int
    metrics_port: int
    host: str = "127.0.0.1"
    lease_ms: int = DEFAULT_LEASE_MS

    @classmethod
    def on_free_ports(cls, host: str = "127.0.0.1", lease_ms: int = DEFAULT_LEASE_MS) -> MasterSpec:
        """A master on two ports free now (RPC and metrics)."""
        port, metrics_port = free_ports(2, host)  # distinct, unlike two separate picks
        return cls(port, metrics_port, host, lease_ms)

    @property
    def url(self) -> str:
        """The `remote_url` that engines and our Mooncake backend take."""
        return f"mooncakestore://{self.host}:{self.port}?metrics_port={self.metrics_port}"

    @property
    def metrics_url(self) -> str:
        """The master's Prometheus page, from which the backend reads its `stats()`."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """`mooncake_master`'s command line: no HTTP metadata server, logs on stderr."""
        return [
            master_binary(),
            f"--rpc_address={self.host}",
            f"--rpc_port={self.port}",
            f"--metrics_host={self.host}",
            f"--metrics_port={self.metrics_port}",
            "--enable_http_metadata_server=false",
            f"--default_kv_lease_ttl={self.lease_ms}",
            "--logtostderr",
        ]

    def ready(self) -> bool:
        """Both sockets answer: the RPC port accepts and the metrics page serves."""
        with socket.create_connection((self.host, self.port), timeout=2):
            pass
        return httpx.get(self.metrics_url, timeout=2).status_code == 200


def supervised_master(
    spec: MasterSpec, env: Mapping[str, str], log_path: Path, console: Console
) -> tuple[Child, Readiness]:
    """The master as a launcher child: started, health-waited and stopped by the Supervisor."""
    child = Child("mooncake master", spec.command(), env, log_path, console)
    return child, Readiness(spec.ready, f"GET {spec.metrics_url}")


def launcher_member(
    config: SplitwiseConfig, port: int, run_dir: Path, env: Mapping[str, str], console: Console
) -> tuple[tuple[Child, Readiness], Path]:
    """For `serve --store mooncake`: the master on 127.0.0.1:`port`, and the per-run config
    that points the engines at it (as `system.store_member` does for our store)."""
    spec = MasterSpec(port, free_port())
    engines_config = config.model_copy(update={"remote_url": spec.url})
    config_file = dump_config(engines_config, run_dir / "splitwise.yaml")
    member = supervised_master(spec, env, run_dir / "mooncake_master.log", console)
    return member, config_file
