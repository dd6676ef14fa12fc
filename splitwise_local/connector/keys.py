"""Store keys for a prompt's KV chunks: chained digests, identical on every process and host.

A prompt's token ids are cut into chunks of `chunk_size` tokens; the last chunk may be partial
(so prompts shorter than a chunk still transfer). Chunk i's key is

    key_i = blake2b(key_{i-1} || int32-LE tokens of chunk i),  key_{-1} = blake2b(identity)

where `identity` names everything that makes KV bytes incompatible: the model, the KV dtype and
layout, and `chunk_size`. Chaining makes each key cover all tokens up to and including its chunk,
so equal prefixes share keys and a hit on key i implies the whole prefix matches. Nothing here
depends on Python's `hash()` or PYTHONHASHSEED: mismatched keys between prefill and decode are
the most common reason for silent cache misses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DIGEST_BYTES = 20


@dataclass(frozen=True)
class KeyIdentity:
    """What two engines must share for their KV chunks to be interchangeable."""

    model: str
    dtype: str
    layout: str
    chunk_size: int

    def seed(self) -> bytes:
        text = f"splitwise/v1|{self.model}|{self.dtype}|{self.layout}|{self.chunk_size}"
        return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the chunks, the last one possibly partial."""
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def chunk_keys(identity: KeyIdentity, token_ids: Sequence[int]) -> list[str]:
    """Hex keys for every chunk of `token_ids`, in order."""
    tokens = np.asarray(token_ids, dtype="<i4")
    keys: list[str] = []
    previous = identity.seed()
    for start, end in chunk_spans(len(tokens), identity.chunk_size):
        digest = hashlib.blake2b(previous, digest_size=DIGEST_BYTES)
        digest.update(tokens[start:end].tobytes())
        previous = digest.digest()
        keys.append(previous.hex())
    return keys
