"""Our store against LMCache's own server (`LMSLocalBackend`, what configs/example.yaml's
`lm://localhost:8100` was written for), via LMCache's protocol.

Both servers run as processes of their own and are driven by the same client, LMCache's own
`lm://` remote connector (built from the URL by its `CreateConnector`, receiving into its
local CPU allocator), with the same KV-shaped values, in interleaved rounds (best of
`--repeats`). Our store also moves the same bytes through our own protocol (TCP) and shared
memory, alongside, and a raw socket moving them between preallocated buffers shows the
ceiling of any server a TCP client reads from. Goal: our store >= 1.5x LMCache's server on
16 MiB puts and gets.

- put: N puts, then one EXIST on the same connection. LMCache's PUT has no reply; both
  servers handle a connection's requests in order, so that answer is the first moment all N
  values are known stored, and the time includes storing them, not just sending them.
- get: N gets, each received into a fresh buffer of LMCache's allocator, freed after.
- RSS past the cap: 4x our store's capacity of 1 MiB values goes into both servers; their
  RSS is sampled after each capacity's worth. LMCache's server never evicts.

`bench store` runs this after its own measurements (`measure`, `print_tables`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil

from splitwise_bench import report
from splitwise_bench.throughput import SocketBaseline, each, gbps
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.process import terminate
from splitwise_local.store import open_backend
from splitwise_testing.store_child import spawn

if TYPE_CHECKING:
    import torch
    from lmcache.v1.memory_management import MemoryObj

MiB = 1024 * 1024
GOAL = 1.5  # ours / LMCache's server, 16 MiB puts and gets
HEADLINE_MIB = 16
# (layers, tokens, hidden) of a bfloat16 KV_2LTD chunk [2, layers, tokens, hidden] per size.
SHAPES = {1 * MiB: (8, 256, 128), 16 * MiB: (32, 256, 512)}
FILL_VALUE = 1 * MiB


def _quiet_lmcache() -> None:
    """LMCache logs every connection at INFO and its missing controller at WARNING."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")


class LMCacheClient:
    """LMCache's own `lm://` remote connector and the local CPU buffer it receives values into,
    run on a private event loop: exactly what an LMCache-enabled vLLM worker talks to a remote
    store with, minus the GPU. Not thread-safe: one per thread."""

    def __init__(self, url: str, pool_gb: float = 0.125, model: str = "splitwise-bench") -> None:
        _quiet_lmcache()
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector import CreateConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self.model = model
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=256, local_cpu=False, max_local_cpu_size=pool_gb, remote_url=url
        )
        self.metadata = LMCacheMetadata(
            model_name=model,
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(2, 2, 256, 8, 64),
        )
        self.backend = LocalCPUBackend(self.config, self.metadata)
        self._values: list[MemoryObj] = []
        self.loop = asyncio.new_event_loop()
        try:
            self.connector = CreateConnector(
                url, self.loop, self.backend, self.config, self.metadata
            )
        except BaseException:
            self.loop.close()
            self.backend.close()
            raise

    def key(self, chunk: int, dtype: torch.dtype | None = None) -> Any:
        """LMCache's key for chunk number `chunk` of this client's model."""
        import torch
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey(self.model, 1, 0, chunk, dtype or torch.bfloat16)

    def value(
        self, shape: tuple[int, ...], dtype: torch.dtype | None = None, fmt: Any = None
    ) -> MemoryObj:
        """A random value allocated by LMCache's allocator, as its engine would put it."""
        import torch
        from lmcache.v1.memory_management import MemoryFormat

        obj = self.backend.allocate(
            torch.Size(shape), dtype or torch.bfloat16, fmt or MemoryFormat.KV_2LTD
        )
        if obj is None:
            raise MemoryError(f"LMCache's allocator has no room for {shape}")
        data = memoryview(obj.byte_array).cast("B")
        data[:] = os.urandom(len(data))
        self._values.append(obj)
        return obj

    def put(self, key: Any, obj: MemoryObj) -> None:
        obj.ref_count_up()  # the connector gives one reference back, as RemoteBackend expects
        self.loop.run_until_complete(self.connector.put(key, obj))

    def get(self, key: Any) -> MemoryObj | None:
        """The value received into LMCache's allocator; `free` it when done."""
        return self.loop.run_until_complete(self.connector.get(key))

    def exists(self, key: Any) -> bool:
        return self.loop.run_until_complete(self.connector.exists(key))

    @staticmethod
    def free(obj: MemoryObj) -> None:
        obj.ref_count_down()

    def close(self) -> None:
        """Closes the connection and gives back the values `value` made that are still held."""
        for obj in self._values:
            if obj.get_ref_count() > 0:
                obj.ref_count_down()
        with contextlib.suppress(OSError):
            self.loop.run_until_complete(self.connector.close())
        self.loop.close()
        self.backend.close()

    def __enter__(self) -> LMCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def lmcache_server(timeout: float = 60.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """LMCache's own server, `python -m lmcache.v1.server 127.0.0.1 PORT cpu`; yields
    (process, url) once it accepts connections, stops it on exit."""
    _quiet_lmcache()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"LMCache's server exited with {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("LMCache's server did not listen in time") from None
                time.sleep(0.1)
        yield process, f"lm://127.0.0.1:{port}"
    finally:
        terminate(process)


def _lm_put(client: LMCacheClient, keys: list, obj: MemoryObj) -> Callable[[], None]:
    puts = each(keys, lambda key: client.put(key, obj))

    def action() -> None:
        puts()
        client.exists(keys[-1])  # the barrier: answered only after every put was stored

    return action


def _lm_get(client: LMCacheClient, keys: list) -> Callable[[], None]:
    def get_and_free(key: Any) -> None:
        obj = client.get(key)
        if obj is None:
            raise RuntimeError(f"{key.to_string()} missing from the server under test")
        client.free(obj)

    return each(keys, get_and_free)


def _throughput(
    args: argparse.Namespace, lmcache_url: str, ours_urls: tuple[str, str]
) -> list[dict[str, Any]]:
    rows = []
    baseline = SocketBaseline()
    with (
        contextlib.closing(baseline),
        LMCacheClient(lmcache_url) as theirs,
        LMCacheClient(ours_urls[0]) as ours,
        open_backend(ours_urls[0]) as tcp,
        open_backend(ours_urls[1]) as shm,
    ):
        for size, (layers, tokens, hidden) in SHAPES.items():
            count = max(4, args.mb * MiB // size)
            obj = theirs.value((2, layers, tokens, hidden))
            data = memoryview(obj.byte_array).cast("B")
            keys = [theirs.key(size + i) for i in range(count)]
            names = [f"ours-{key.to_string()}" for key in keys]  # beside the LMCache keys
            cases: dict[str, Callable[[], None]] = {
                "lmcache put": _lm_put(theirs, keys, obj),
                "ours put": _lm_put(ours, keys, obj),
                "tcp put": each(names, lambda name, v=data: tcp.put(name, v)),
                "shm put": each(names, lambda name, v=data: shm.put(name, v)),
                "socket put": each(names, lambda _, v=data: baseline.put(v)),
                "lmcache get": _lm_get(theirs, keys),
                "ours get": _lm_get(ours, keys),
                "tcp get": each(names, tcp.get),
                "shm get": each(names, shm.get),
                "socket get": each(names, lambda _, n=size: baseline.get(n)),
            }
            for action in cases.values():  # warm-up: every page touched once
                action()
            rounds = [
                {name: gbps(action, count * size) for name, action in cases.items()}
                for _ in range(args.repeats)
            ]
            best = {name: max(r[name] for r in rounds) for name in cases}
            theirs.free(obj)
            for op in ("put", "get"):
                rows.append(
                    {
                        "op": op,
                        "size_mib": size // MiB,
                        "lmcache_server_gbps": best[f"lmcache {op}"],
                        "ours_gbps": best[f"ours {op}"],
                        "ratio": best[f"ours {op}"] / best[f"lmcache {op}"],
                        "goal": GOAL if size // MiB == HEADLINE_MIB else None,
                        "ours_tcp_gbps": best[f"tcp {op}"],
                        "ours_shm_gbps": best[f"shm {op}"],
                        "socket_gbps": best[f"socket {op}"],
                    }
                )
    return rows


def _fill(args: argparse.Namespace, lmcache: subprocess.Popen, lmcache_url: str) -> dict:
    """The same 1 MiB values into both servers until 4x our capacity went through."""
    cap_mb = args.fill_cap_mb
    samples = []
    with (
        spawn("--max-size-gb", str(cap_mb / 1024), "--shm-name", f"lmc-fill-{os.getpid()}") as st,
        LMCacheClient(lmcache_url) as theirs,
        LMCacheClient(st.tcp_url) as ours,
    ):
        obj = theirs.value((2, *SHAPES[FILL_VALUE]))
        chunk = 0
        for written in range(1, 5):
            for _ in range(cap_mb * MiB // FILL_VALUE):
                key = theirs.key(10**9 + chunk)
                theirs.put(key, obj)
                ours.put(key, obj)
                chunk += 1
            for client in (theirs, ours):
                client.exists(key)  # both servers have stored everything sent so far
            samples.append(
                {
                    "written_mib": written * cap_mb,
                    "ours_rss_mib": psutil.Process(st.process.pid).memory_info().rss / MiB,
                    "lmcache_rss_mib": psutil.Process(lmcache.pid).memory_info().rss / MiB,
                }
            )
        theirs.free(obj)
    limit_mib = cap_mb * 1.1 + 100
    return {
        "capacity_mib": cap_mb,
        "samples": samples,
        "ours_rss_limit_mib": limit_mib,
        "ours_flat": all(s["ours_rss_mib"] <= limit_mib for s in samples),
        "lmcache_growth_mib": samples[-1]["lmcache_rss_mib"] - samples[0]["lmcache_rss_mib"],
        "ours_growth_mib": samples[-1]["ours_rss_mib"] - samples[0]["ours_rss_mib"],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs both comparisons; returns rows, fill samples and the headline ratios."""
    # Both key sets (LMCache's protocol, ours) of both sizes, with room to spare: no eviction.
    per_set = sum(max(4 * size, args.mb * MiB) for size in SHAPES)
    capacity_gb = 2.5 * per_set / 1024**3
    name = f"lmc-{os.getpid()}"
    with (
        lmcache_server() as (_, lmcache_url),
        spawn("--max-size-gb", str(capacity_gb), "--shm-name", name) as store,
    ):
        throughput = _throughput(args, lmcache_url, (store.tcp_url, store.shm_url))
    with lmcache_server() as (process, lmcache_url):
        fill = _fill(args, process, lmcache_url)

    def headline(op: str) -> float:
        return next(r["ratio"] for r in throughput if (r["op"], r["size_mib"]) == (op, 16))

    return {
        "throughput": throughput,
        "fill": fill,
        "ratios": {
            "ours_vs_lmcache_server_put": headline("put"),
            "ours_vs_lmcache_server_get": headline("get"),
            **{
                f"ours_vs_lmcache_server_{r['op']}_{r['size_mib']}mib": r["ratio"]
                for r in throughput
            },
            **{
                f"lmcache_server_vs_socket_{r['op']}_{r['size_mib']}mib": r["lmcache_server_gbps"]
                / r["socket_gbps"]
                for r in throughput
            },
        },
        "goals": {"ours_vs_lmcache_server_min": GOAL},
    }


def print_tables(results: dict[str, Any]) -> None:
    report.print_table(
        "Through LMCache's protocol and client: LMCache's server vs our store (GB/s, best of"
        " rounds); a raw socket, our own protocol and shared memory alongside",
        [
            "op",
            "size",
            "LMCache server",
            "our store",
            "ratio",
            "goal",
            "ok",
            "raw socket",
            "ours tcp",
            "ours shm",
        ],
        [
            [
                *(r["op"], f"{r['size_mib']} MiB", r["lmcache_server_gbps"], r["ours_gbps"]),
                r["ratio"],
                r["goal"] or "-",
                "-" if r["goal"] is None else r["ratio"] >= r["goal"],
                *(r["socket_gbps"], r["ours_tcp_gbps"], r["ours_shm_gbps"]),
            ]
            for r in results["throughput"]
        ],
    )
    fill = results["fill"]
    report.print_table(
        f"RSS past the cap: 1 MiB values through LMCache's client into both servers "
        f"(our capacity {fill['capacity_mib']} MiB; LMCache's server has no cap)",
        ["written MiB", "our store RSS MiB", "LMCache server RSS MiB"],
        [[s["written_mib"], s["ours_rss_mib"], s["lmcache_rss_mib"]] for s in fill["samples"]],
    )
    print(
        f"our store: RSS {'flat' if fill['ours_flat'] else 'NOT flat'} "
        f"(limit {fill['ours_rss_limit_mib']:.0f} MiB, grew {fill['ours_growth_mib']:.0f} MiB);"
        f" LMCache's server grew {fill['lmcache_growth_mib']:.0f} MiB"
    )
