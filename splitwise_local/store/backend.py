"""The one interface the connector stores KV through, chosen by the scheme of `remote_url`.

`lm://host:port` is our store over TCP, `shm://NAME` the same store through shared memory on
this host. Other engines (e.g. Mooncake for multi-host use) plug in with one registry entry
naming their factory, imported only when a URL asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from splitwise_local.config import SplitwiseConfig

Value = bytes | bytearray | memoryview


class KVBackend(Protocol):
    """Sync, thread-safe. Keys are strings (hex digests); values are bytes-like."""

    def put(self, key: str, value: Value) -> None:
        """Returns once the value is visible to every reader."""

    def put_many(self, items: Sequence[tuple[str, Value]]) -> None: ...

    def get(self, key: str) -> bytes | memoryview | None:
        """None is a miss, not an error."""

    def get_many(self, keys: Sequence[str]) -> Sequence[bytes | memoryview | None]: ...

    def exists(self, keys: Sequence[str]) -> int:
        """The length of the present prefix of `keys`."""

    def delete(self, key: str) -> bool: ...

    def stats(self) -> dict[str, Any]:
        """At least items, bytes, capacity, hits, misses, evictions."""

    def close(self) -> None: ...


BackendFactory = Callable[[str, "SplitwiseConfig | None"], KVBackend]

# scheme -> "module:function" of a BackendFactory, imported on first use.
BACKENDS: dict[str, str] = {
    "lm": "splitwise_local.store.backend:open_tcp",
    "shm": "splitwise_local.store.backend:open_shm",
    "mooncakestore": "splitwise_local.store.mooncake:open_mooncake",
}


def register_backend(scheme: str, factory: str) -> None:
    """Adds or replaces the backend for `scheme://`; `factory` is "module:function"."""
    BACKENDS[scheme] = factory


def open_backend(url: str, config: SplitwiseConfig | None = None) -> KVBackend:
    """A connected backend for `url`; the auth token comes from `config.store_auth_token`."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        raise ValueError(f"store URL {url!r} is not SCHEME://ADDRESS")
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ValueError(f"unknown store scheme {scheme}:// in {url!r}; known: {known}")
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"the {scheme}:// backend is not available here: {exc}") from None
    factory: BackendFactory = getattr(module, function)
    return factory(url, config)


def open_tcp(url: str, config: SplitwiseConfig | None) -> KVBackend:
    # Late, as the registry loads every backend: the clients bring numpy (50 ms), which the
    # launcher's probes, importing this module, do not need.
    from splitwise_local.store.client import StoreClient

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"expected lm://HOST:PORT, got {url!r}")
    return StoreClient.tcp(parts.hostname, port, token=_token(config))


def open_shm(url: str, config: SplitwiseConfig | None) -> KVBackend:
    # Late for the same reason as open_tcp's.
    from splitwise_local.store.client import ShmClient
    from splitwise_local.store.transport import control_address

    name = url.removeprefix("shm://")
    control_address(name)  # validates the name
    return ShmClient(name, token=_token(config))


def _token(config: SplitwiseConfig | None) -> str | None:
    return config.store_auth_token if config is not None else None
