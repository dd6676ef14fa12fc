"""Helpers shared by the launcher tests: free ports, fake engines; the launcher subprocess and
the leftover checks are the benchmarks' (splitwise_testing/launch.py)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitwise_local.serve.ports import free_ports
from splitwise_testing.launch import Launch, leftovers, sweep

__all__ = ["Launch", "free_ports", "leftovers", "sweep"]  # re-exported for the tests

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
TRIGGER = "engines-go-bad"  # `flaky` and `sick` engines turn bad 3 s after this file appears
READY = "ready: http://"


def free_run(count: int, avoid: Sequence[int] = ()) -> int:
    """The first of `count` consecutive ports that are all free now (and not in `avoid`)."""
    for _ in range(100):
        first = free_ports(1)[0]
        run = range(first, first + count)
        if first + count > 65535 or set(run) & set(avoid):
            continue
        sockets = [socket.socket() for _ in run]
        try:
            for sock, port in zip(sockets, run, strict=True):
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError(f"no {count} consecutive free ports found")


@dataclass
class Ports:
    proxy: int
    prefill: int
    decode: int
    store: int
    store_metrics: int

    @classmethod
    def for_engines(cls, prefill: int, decode: int) -> Ports:
        """Free ports for the proxy, the store and runs of `prefill` and `decode` engines."""
        proxy, store, store_metrics = free_ports(3)
        first_prefill = free_run(prefill, [proxy, store, store_metrics])
        taken = [proxy, store, store_metrics, *range(first_prefill, first_prefill + prefill)]
        return cls(proxy, first_prefill, free_run(decode, taken), store, store_metrics)

    def args(self) -> list[str]:
        return [
            "--port",
            str(self.proxy),
            "--prefill-port",
            str(self.prefill),
            "--decode-port",
            str(self.decode),
            "--store-port",
            str(self.store),
            "--store-metrics-port",
            str(self.store_metrics),
        ]


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_env(tmp_path: Path, ports: Ports, modes: dict[int, str] | None = None) -> dict[str, str]:
    """The environment that makes the launcher's engines the fake engine of fake_vllm/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_VLLM), env.get("PYTHONPATH")]))
    env["FAKE_ENGINE_EVENTS"] = str(tmp_path / "events.jsonl")
    env["FAKE_PROXY_PORT"] = str(ports.proxy)
    env["FAKE_STORE_PORT"] = str(ports.store)
    env.setdefault("SPLITWISE_CPU_DTYPE", "bfloat16")  # no real vLLM to measure a dtype with
    env["FAKE_ENGINE_TRIGGER"] = str(tmp_path / TRIGGER)
    for port, mode in (modes or {}).items():
        env[f"FAKE_ENGINE_MODE_{port}"] = mode
    return env


def launch_fake(
    tmp_path: Path,
    ports: Ports,
    model: Path,
    *extra: str,
    modes: dict[int, str] | None = None,
    connector: str = "splitwise",
) -> Launch:
    """The launcher on the CPU with fake_vllm's engines (and the real store and proxy)."""
    args = ["--device", "cpu", "--model", str(model), "--connector", connector, *ports.args()]
    return Launch([*args, *extra], tmp_path / "run", fake_env(tmp_path, ports, modes))
