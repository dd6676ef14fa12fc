"""The KV store: an in-host CPU-DRAM store with a shared-memory path and a TCP path, and an
optional disk tier below DRAM.

Clients use `open_backend(url)`; the server is `python -m splitwise_local store`. The wire
format is in docs/wire-format.md; the order to read the package is in its README.md.
"""

from splitwise_local.store.backend import KVBackend, open_backend, register_backend
from splitwise_local.store.errors import (
    AuthError,
    ProtocolError,
    StoreError,
    StoreFull,
    StoreUnavailable,
    ValueTooLarge,
)

__all__ = [
    "AuthError",
    "KVBackend",
    "ProtocolError",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "ValueTooLarge",
    "open_backend",
    "register_backend",
]
