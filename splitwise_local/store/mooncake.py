"""`mooncakestore://HOST:PORT`: Mooncake Store behind the same interface as our own store.

Mooncake Store (the KV store of Kimi's serving system) spreads values over memory segments that
its clients mount, with a master (`HOST:PORT`, its RPC port) recording where each key lives; a
client reads and writes other clients' segments directly over TCP or RDMA. It is the backend for
KV shared across hosts. Settings come from the YAML `mooncake:` section, named as in Mooncake's
own config; `?metrics_port=N` (Mooncake's default 9003) names the master's metrics page, which
`stats()` reads. A local master: `splitwise_local.serve.mooncake_master`.

Zero copy: a put sends straight from the caller's buffers (registered with the transfer engine
for the call, `batch_upsert_from`); a get looks the sizes up (`batch_get_replica_desc`) and
reads into one fresh buffer registered for the call (`batch_get_into`), whose slices it returns.
Neither passes through Mooncake's local buffer, so values larger than `local_buffer_size` work.
A put replaces an existing value (Mooncake's upsert), as our store does.

Bounded: Mooncake's RPC, connect and TCP transfer deadlines are set from `timeout` (unless
already set in the environment: they are per process), the master is probed before the client
starts, after any failure and before closing (a dead master then fails in microseconds, not
after Mooncake's reconnect attempts). Failures raise `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from splitwise_local.store.errors import StoreError, StoreFull, StoreUnavailable, ValueTooLarge

if TYPE_CHECKING:
    from splitwise_local.config import MooncakeOptions, SplitwiseConfig

Value = bytes | bytearray | memoryview
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_METRICS_PORT = 9003  # mooncake_master's own default
SETUP_RETRIES = 3  # Mooncake's default, 20, retries a dead master for minutes
# A full store fails a put and evicts in the background (every 10 ms, when its threads get a
# core): a put that found no room tries again for up to FULL_WAIT_S.
FULL_WAIT_S, FULL_RETRY_S = 2.0, 0.02

OK, NOT_FOUND, HAS_LEASE = 0, -704, -706
NO_ROOM = {-200: "no segment has room", -101: "no segment is mounted"}
CODE_NAMES = {
    -1: "internal error",
    -10: "buffer overflow",
    -103: "the master does not know this client",
    -600: "invalid parameters",
    -703: "replica not ready",
    -707: "lease expired during the transfer",
    -712: "replica is gone",
    -800: "transfer failed",
    -900: "RPC to the master failed",
    -901: "RPC to the master timed out",
}


@dataclass(frozen=True)
class MasterAddress:
    host: str
    port: int
    metrics_port: int = DEFAULT_METRICS_PORT

    @classmethod
    def parse(cls, url: str) -> MasterAddress:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
        unknown = set(query) - {"metrics_port"}
        metrics = query.get("metrics_port", [str(DEFAULT_METRICS_PORT)])
        if (
            parts.scheme != "mooncakestore"
            or not parts.hostname
            or port is None
            or parts.path not in ("", "/")
            or unknown
            or len(metrics) != 1
            or not metrics[0].isdigit()
        ):
            raise ValueError(f"expected mooncakestore://HOST:PORT[?metrics_port=N], got {url!r}")
        return cls(parts.hostname, port, int(metrics[0]))

    @property
    def rpc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"mooncakestore://{self.rpc}"


DEADLINE_VARIABLES = (
    "MC_RPC_TIMEOUT_MS",
    "MC_RPC_CONNECT_TIMEOUT_MS",
    "MC_TCP_STATUS_TIMEOUT_SEC",
    "MC_STORE_CLIENT_SETUP_RETRIES",
)
USER_DEADLINES = frozenset(name for name in DEADLINE_VARIABLES if name in os.environ)


def set_deadlines(timeout: float) -> None:
    """Mooncake reads its deadlines from the environment when a client starts (the TCP one at
    each transfer, so per process); those the user set before we were imported win."""
    millis = str(max(1, int(timeout * 1000)))
    values = {
        "MC_RPC_TIMEOUT_MS": millis,
        "MC_RPC_CONNECT_TIMEOUT_MS": millis,
        "MC_TCP_STATUS_TIMEOUT_SEC": str(max(1, math.ceil(timeout))),
        "MC_STORE_CLIENT_SETUP_RETRIES": str(SETUP_RETRIES),
    }
    for name, value in values.items():
        if name not in USER_DEADLINES:
            os.environ[name] = value


def byte_array(value: Value) -> np.ndarray:
    """A uint8 array over the caller's bytes, without copying them."""
    return np.frombuffer(memoryview(value).cast("B"), dtype=np.uint8)


def merged_spans(arrays: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """The address ranges the arrays cover, overlapping or touching ones merged: the transfer
    engine refuses to register a range that overlaps one already registered."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


class MooncakeBackend:
    """A `KVBackend` on a Mooncake Store client; thread-safe (Mooncake releases the GIL)."""

    def __init__(
        self, master: MasterAddress, options: MooncakeOptions, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.master = master
        self.endpoint = master.url
        self.timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        self._suspect = False  # the last call failed: probe the master before the next one
        self._counts = {"hits": 0, "misses": 0, "puts": 0}
        set_deadlines(timeout)
        self._probe()
        try:
            from mooncake.store import MooncakeDistributedStore  # type: ignore[import-untyped]
        except ImportError as exc:
            raise StoreUnavailable(
                f"{self.endpoint}: cannot load Mooncake ({exc}); scripts/setup.sh installs "
                "mooncake-transfer-engine-non-cuda and Debian's libibverbs1"
            ) from exc
        self._store = MooncakeDistributedStore()
        code = self._store.setup(
            options.local_hostname,
            options.metadata_server,
            options.global_segment_size,
            options.local_buffer_size,
            options.protocol,
            options.device_name,
            master.rpc,
        )
        if code != OK:
            raise StoreUnavailable(
                f"{self.endpoint}: Mooncake client setup failed ({code}; protocol="
                f"{options.protocol}, device_name={options.device_name!r}, local_hostname="
                f"{options.local_hostname}); Mooncake's log lines above say why"
            )

    # -- the KVBackend interface -----------------------------------------------------------

    def put(self, key: str, value: Value) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[str, Value]]) -> None:
        if not items:
            return
        latest = dict(items)  # a key given twice keeps its last value, as with two puts
        keys = list(latest)
        arrays = [byte_array(value) for value in latest.values()]
        empty = [key for key, array in zip(keys, arrays, strict=True) if array.nbytes == 0]
        if empty:
            raise ValueError(f"Mooncake cannot store an empty value (key {empty[0]!r})")
        self._ready()
        sizes = [array.nbytes for array in arrays]
        pending = list(range(len(keys)))
        deadline, checked = time.monotonic() + FULL_WAIT_S, False
        with self._registered(arrays) as pointers:
            while pending:
                codes = self._store.batch_upsert_from(
                    [keys[i] for i in pending],
                    [pointers[i] for i in pending],
                    [sizes[i] for i in pending],
                )
                failed = [(i, code) for i, code in zip(pending, codes, strict=True) if code != OK]
                for i, code in failed:
                    if code not in NO_ROOM or time.monotonic() > deadline:
                        self._fail(code, f"put {keys[i]!r}")
                if failed and not checked:
                    self._check_fits(max(sizes[i] for i, _ in failed))
                    checked = True
                pending = [i for i, _ in failed]
                if pending:
                    time.sleep(FULL_RETRY_S)  # the master evicts in the background
        with self._lock:
            self._counts["puts"] += len(keys)

    def get(self, key: str) -> memoryview | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[memoryview | None]:
        if not keys:
            return []
        self._ready()
        unique = list(dict.fromkeys(keys))  # Mooncake fills one buffer per key of a batch
        fetched = dict(zip(unique, self._fetch(unique), strict=True))
        values = [fetched[key] for key in keys]
        found = sum(value is not None for value in values)
        with self._lock:
            self._counts["hits"] += found
            self._counts["misses"] += len(keys) - found
        return values

    def exists(self, keys: Sequence[str]) -> int:
        """The length of the present prefix of `keys`."""
        if not keys:
            return 0
        self._ready()
        present = 0
        for code in self._store.batch_is_exist(list(keys)):
            if code == 0:
                break
            if code != 1:
                self._fail(code, "exists")
            present += 1
        return present

    def delete(self, key: str) -> bool:
        """False if absent; a value being read stays until its read lease ends (an error)."""
        self._ready()
        code = self._store.remove(key)
        if code == NOT_FOUND:
            return False
        if code == HAS_LEASE:
            raise StoreError(f"{self.endpoint}: {key!r} is leased to a reader; retry later")
        if code != OK:
            self._fail(code, f"delete {key!r}")
        return True

    def stats(self) -> dict[str, Any]:
        """The master's totals (items, bytes, capacity, evictions) and this client's hits,
        misses and puts."""
        metrics, segments = self._metrics()
        with self._lock:
            counts = dict(self._counts)
        return {
            "items": int(metrics.get("master_key_count", 0)),
            "bytes": int(metrics.get("master_allocated_bytes", 0)),
            "capacity": int(metrics.get("master_total_capacity_bytes", 0)),
            "evictions": int(metrics.get("master_evicted_key_count", 0)),
            "clients": int(metrics.get("master_active_clients", 0)),
            "segments": len(segments),
            **counts,
        }

    def close(self) -> None:
        """Unmounts this client's segment (its values go with it), in about 2 s.

        If the master is gone, Mooncake would retry the unmount for tens of seconds while
        holding the GIL (freezing every thread of an engine that is shutting down), and again
        when the client is destroyed; such a client is left unclosed and never destroyed
        instead: the operating system reclaims it with the process.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._probe()
        except StoreUnavailable:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._store))
            return
        self._store.close()

    def __enter__(self) -> MooncakeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------

    def _probe(self) -> None:
        try:
            with socket.create_connection((self.master.host, self.master.port), self.timeout):
                pass
        except OSError as exc:
            self._suspect = True
            raise StoreUnavailable(f"{self.endpoint}: cannot reach the master: {exc}") from exc
        self._suspect = False

    def _ready(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.endpoint}: client is closed")
        if self._suspect:
            self._probe()

    def _fail(self, code: int, what: str) -> None:
        if code in NO_ROOM:
            raise StoreFull(f"{self.endpoint}: {what}: {NO_ROOM[code]} ({code})")
        self._suspect = True
        reason = CODE_NAMES.get(code, "Mooncake error")
        raise StoreUnavailable(f"{self.endpoint}: {what}: {reason} ({code})")

    def _metrics(self) -> tuple[dict[str, float], list[float]]:
        """The master's unlabelled metrics, and each mounted segment's capacity."""
        # Late: only stats() reads the master's page (httpx alone takes 0.1 s to import).
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{self.master.host}:{self.master.metrics_port}/metrics"
        try:
            reply = httpx.get(url, timeout=self.timeout)
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            raise StoreUnavailable(
                f"{self.endpoint}: cannot read the master's {url}: {exc}"
            ) from exc
        metrics: dict[str, float] = {}
        segments: list[float] = []
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                if sample.name == "segment_total_capacity_bytes":
                    segments.append(sample.value)
                elif not sample.labels:
                    metrics[sample.name] = sample.value
        return metrics, segments

    def _check_fits(self, size: int) -> None:
        """A value must fit in one segment: larger ones would never be stored, and every
        attempt would make the master evict for nothing. (Unknown without the metrics page;
        with no segment at all, the put waits for one to be mounted.)"""
        with contextlib.suppress(StoreUnavailable):
            segments = self._metrics()[1]
            if segments and size > max(segments):
                raise ValueTooLarge(
                    f"{self.endpoint}: a {size}-byte value is larger than every segment "
                    f"(largest {int(max(segments))} bytes)"
                )

    def _fetch(self, keys: list[str]) -> list[memoryview | None]:
        """Distinct keys' values, read into one buffer registered for the call."""
        sizes = self._sizes(keys)
        present = [i for i, size in enumerate(sizes) if size is not None]
        values: list[memoryview | None] = [None] * len(keys)
        if not present:
            return values
        offsets = np.cumsum([0] + [sizes[i] for i in present])
        block = np.empty(int(offsets[-1]), dtype=np.uint8)
        with self._registered([block]) as (base,):
            codes = self._store.batch_get_into(
                [keys[i] for i in present],
                [base + int(offset) for offset in offsets[:-1]],
                [sizes[i] for i in present],
            )
        for i, start, code in zip(present, offsets[:-1], codes, strict=True):
            if code >= 0:
                values[i] = block[int(start) : int(start) + code].data
            elif code != NOT_FOUND:  # NOT_FOUND: evicted or deleted since the lookup
                self._fail(code, f"get {keys[i]!r}")
        return values

    def _sizes(self, keys: Sequence[str]) -> list[int | None]:
        """Each value's size, None for a missing key. Mooncake's lookup leaves out both missing
        keys and failed lookups; an existence check tells the two apart."""
        found = self._store.batch_get_replica_desc(list(keys))
        sizes: list[int | None] = []
        for key in keys:
            memory = [r for r in found.get(key, ()) if r.is_memory_replica()]
            size = memory[0].get_memory_descriptor().buffer_descriptor.size if memory else None
            sizes.append(size)
        absent = [key for key, size in zip(keys, sizes, strict=True) if size is None]
        if absent:
            for code in self._store.batch_is_exist(absent):
                if code not in (0, 1):  # 1: appeared since; read it next time
                    self._fail(code, "get (lookup)")
        return sizes

    @contextlib.contextmanager
    def _registered(self, arrays: Sequence[np.ndarray]) -> Iterator[list[int]]:
        """The arrays' addresses, registered with the transfer engine for the block.

        A range that cannot be registered (another thread has the same buffer registered right
        now) is copied into a private buffer instead: slower, never wrong.
        """
        pointers = [array.ctypes.data for array in arrays]
        copies: list[np.ndarray] = []  # kept alive until the transfer is done
        registered: list[int] = []
        try:
            for start, size in merged_spans(arrays):
                if self._store.register_buffer(start, size) == OK:
                    registered.append(start)
                    continue
                for i, array in enumerate(arrays):
                    if array.nbytes and start <= pointers[i] < start + size:
                        copies.append(array.copy())
                        pointers[i] = copies[-1].ctypes.data
                        if self._store.register_buffer(pointers[i], array.nbytes) != OK:
                            raise StoreUnavailable(f"{self.endpoint}: cannot register a buffer")
                        registered.append(pointers[i])
            yield pointers
        finally:
            for start in registered:
                self._store.unregister_buffer(start)


def open_mooncake(url: str, config: SplitwiseConfig | None) -> MooncakeBackend:
    """The `mooncakestore://` factory named in the backend registry."""
    # Late: the config module (pydantic) is needed only when no config was handed over.
    from splitwise_local.config import MooncakeOptions

    options = config.mooncake if config is not None else MooncakeOptions()
    return MooncakeBackend(MasterAddress.parse(url), options)
