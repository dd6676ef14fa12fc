"""Our vLLM KV connector. vLLM loads `SplitwiseConnector` from this package by name.

The import is lazy so that keys and layouts can be used without importing vLLM.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "SplitwiseConnector":
        from splitwise_local.connector.connector import SplitwiseConnector  # imports vLLM

        return SplitwiseConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
