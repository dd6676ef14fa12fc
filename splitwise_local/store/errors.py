"""The store's exceptions: one base class the connector catches, subclasses that say why.

A miss is not an error (get returns None); these are raised only when the store cannot do what
was asked, so a caller may treat any `StoreError` as "store unavailable for this request".
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every failure the store client raises."""


class StoreUnavailable(StoreError):
    """The server cannot be reached, timed out, or dropped the connection."""


class ValueTooLarge(StoreError):
    """The value exceeds the server's largest value or its whole capacity; nothing was stored."""


class StoreFull(StoreError):
    """No room even after evicting: everything left is pinned by readers or being written."""


class AuthError(StoreError):
    """The server requires a token and the one given is missing or wrong."""


class ProtocolError(StoreError):
    """A frame that does not follow docs/wire-format.md (bad magic, version, length, opcode)."""
