"""Store keys for a prompt's KV chunks: chained digests, identical on every process and host.

A prompt's token ids are cut into chunks of `chunk_size` tokens; the last chunk may be partial
(so prompts shorter than a chunk still transfer). Chunk i's key is

    key_i = blake2b(key_{i-1} || uint32-LE n_i || int32-LE tokens of chunk i || extras_i)
    key_{-1} = identity.seed()

where the identity names everything that makes KV bytes incompatible: the model's fingerprint,
the KV dtype and layout, `chunk_size`, and the tensor- and pipeline-parallel size and rank (each
rank holds different heads or layers, so each has its own chain). Chaining makes each key cover
all tokens up to and including its chunk, so equal prefixes share keys and a hit on key i
implies the whole prefix matches. Nothing here depends on Python's `hash()` or PYTHONHASHSEED:
mismatched keys between prefill and decode are the most common reason for silent cache misses.

`extras_i` is what vLLM's own prefix cache hashes besides the tokens
(`vllm/v1/core/kv_cache_utils.py`, `generate_block_hash_extra_keys`), per chunk as vLLM does
per block, from the same request fields (`KeyExtras`): the LoRA adapter's name and path in
every chunk, each multimodal item's hash (with its offset from the chunk's start) in every
chunk its placeholder tokens overlap, and `cache_salt` in the first chunk only (the chain
carries it on). Equal tokens under another adapter, image or salt therefore never share KV.
A request whose KV depends on what no key can name exactly (prompt embeddings) raises
`Uncovered` in `request_key_extras`: the connector neither saves nor loads it.

This module imports neither vLLM nor torch, so the proxy derives exactly the connector's keys:

    identity = key_identity("/models/SmolLM2", dtype="bfloat16",
                            layout=per_head_layout(3, 64), chunk_size=256)
    keys = chunk_keys(identity, prompt_token_ids)      # rank 0: what the scheduler asks for
    keys = chunk_keys(identity, ids, KeyExtras(cache_salt="tenant-a"))  # a salted request

The connector builds its identity through the same `key_identity` from vLLM's config and logs
it once at startup (`splitwise key identity ... seed=<hex>`), so a mismatch is visible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

DIGEST_BYTES = 20
KEY_VERSION = "splitwise/v3"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Fields of config.json that change when the same weights are re-saved, not the model.
VOLATILE_CONFIG_FIELDS = ("_name_or_path", "transformers_version")
TENSOR_SAMPLE_BYTES = 4096  # read from the middle of every tensor of a safetensors file
SAMPLES_PER_FILE = 16  # other weight formats: evenly spread windows of the file
SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class KeyIdentity:
    """What two engines (or ranks) must share for their KV chunks to be interchangeable.

    Build it with `key_identity`, which normalises the fields; the constructor takes them as
    given (tests use short made-up names).
    """

    model: str
    dtype: str
    layout: str
    chunk_size: int
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"rank outside the parallel sizes: {self}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")

    def seed(self) -> bytes:
        text = "|".join(
            str(part)
            for part in (
                KEY_VERSION, self.model, self.dtype, self.layout, self.chunk_size,
                f"tp{self.tp_rank}/{self.tp_size}", f"pp{self.pp_rank}/{self.pp_size}",
            )
        )  # fmt: skip
        return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()

    @property
    def rank_index(self) -> int:
        """This rank's position in `all_ranks()`."""
        return self.pp_rank * self.tp_size + self.tp_rank

    def all_ranks(self) -> list[KeyIdentity]:
        """The identity of every rank of this engine, pipeline-stage major."""
        return [
            replace(self, tp_rank=tp, pp_rank=pp)
            for pp in range(self.pp_size)
            for tp in range(self.tp_size)
        ]

    def describe(self) -> str:
        """One log line's worth: every field and the seed digest."""
        return (
            f"model={self.model} dtype={self.dtype} layout={self.layout} "
            f"chunk={self.chunk_size} tp={self.tp_rank}/{self.tp_size} "
            f"pp={self.pp_rank}/{self.pp_size} seed={self.seed().hex()}"
        )


def model_fingerprint(model: str | Path) -> str:
    """A digest of what makes a checkpoint's KV its own, not of where the folder lives.

    Folds in config.json (parsed, keys sorted, without fields that only record who saved it)
    and, for every weight file at the folder's top level, its name and size and a sample of
    its bytes: for safetensors the header (every tensor's name, dtype, shape) and 4 KiB from
    the middle of every tensor, for other formats 16 windows spread over the file. Two
    fine-tunes of one base have equal names and sizes, but a fine-tune (a merged LoRA too)
    changes whole tensors densely, so the samples tell them apart without hashing gigabytes
    at every start; a change confined to bytes outside every sample would go unnoticed. The
    folder's name and path are left out, so copies of one checkpoint on different hosts share
    chunks.

    `model` is a folder, or a Hugging Face id found in the local cache (no network); anything
    else raises `FileNotFoundError`.
    """
    folder = _model_folder(model)
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for field in VOLATILE_CONFIG_FIELDS:
            config.pop(field, None)
        digest.update(json.dumps(config, sort_keys=True).encode())
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights and not config_file.is_file():
        raise FileNotFoundError(f"{folder}: neither config.json nor weight files")
    for path in weights:
        size = path.stat().st_size
        digest.update(f"|{path.name}|{size}|".encode())
        with path.open("rb") as file:
            windows = _safetensors_windows(file, size) if path.suffix == ".safetensors" else None
            for offset, length in windows or _spread_windows(size):
                file.seek(offset)
                digest.update(file.read(length))
    return digest.hexdigest()


def _safetensors_windows(file: BinaryIO, size: int) -> list[tuple[int, int]] | None:
    """The header, then the middle of every tensor; None if the file is not safetensors."""
    head = file.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < header_len <= size - 8:
        return None
    try:
        header = json.loads(file.read(header_len))
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError):
        return None
    windows = [(0, 8 + header_len)]
    for begin, end in sorted(spans):
        length = min(TENSOR_SAMPLE_BYTES, end - begin)
        windows.append((8 + header_len + (begin + end - length) // 2, length))
    return windows


def _spread_windows(size: int) -> list[tuple[int, int]]:
    if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
        return [(0, size)]
    last = size - SAMPLE_BYTES
    return [(last * i // (SAMPLES_PER_FILE - 1), SAMPLE_BYTES) for i in range(SAMPLES_PER_FILE)]


def _model_folder(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    # Only a model named by Hub id needs the Hub's client, and importing it costs the proxy,
    # which imports this module, about 0.2 s.
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as exc:  # not a folder and not in the local Hugging Face cache
        raise FileNotFoundError(f"model {model!r}: not a folder nor a cached Hub id") from exc


def per_head_layout(kv_heads_per_rank: int, head_size: int) -> str:
    """The layout field of an ordinary attention cache (K and V per KV head, on one rank)."""
    return f"per-head/{kv_heads_per_rank}x{head_size}"


def mla_layout(latent_width: int) -> str:
    """The layout field of an MLA cache (one latent vector per token)."""
    return f"mla-latent/{latent_width}"


def normalise_dtype(dtype: object) -> str:
    """`torch.bfloat16` and `"bfloat16"` name the same thing; fp8 cache dtypes stay as given."""
    return str(dtype).removeprefix("torch.")


def key_identity(
    model: str | Path,
    *,
    dtype: object,
    layout: str,
    chunk_size: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    pp_size: int = 1,
    pp_rank: int = 0,
) -> KeyIdentity:
    """The identity of one rank's chunks, from facts known without vLLM.

    `model` is the checkpoint folder (or a cached Hub id) the engine serves, `dtype` the KV
    cache's dtype (the model dtype unless `--kv-cache-dtype` says otherwise), `layout` from
    `per_head_layout` or `mla_layout` with the heads of one tensor-parallel rank.
    """
    return KeyIdentity(
        model_fingerprint(model), normalise_dtype(dtype), layout, chunk_size,
        tp_size, tp_rank, pp_size, pp_rank,
    )  # fmt: skip


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the chunks, the last one possibly partial."""
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


@dataclass(frozen=True)
class MultimodalItem:
    """One multimodal input as vLLM's prefix cache sees it: its hash (`identifier`, which
    carries the LoRA prefix when an adapter encodes it) and the prompt tokens
    [offset, offset + length) its placeholder covers."""

    identifier: str
    offset: int
    length: int


@dataclass(frozen=True)
class KeyExtras:
    """What, besides the token ids, vLLM's block hash covers: `lora` as (name, path), the
    request's multimodal items in vLLM's order, and `cache_salt`."""

    lora: tuple[str, str] | None = None
    cache_salt: str | None = None
    multimodal: tuple[MultimodalItem, ...] = ()

    def for_chunk(self, start: int, end: int) -> list[tuple[Any, ...]]:
        """The tagged extras of the chunk of tokens [start, end), in vLLM's order (LoRA, then
        multimodal items, then the salt) and shape (`generate_block_hash_extra_keys`)."""
        extras: list[tuple[Any, ...]] = []
        if self.lora is not None:
            extras.append(("lora", *self.lora))
        for item in self.multimodal:
            if item.offset < end and start < item.offset + item.length:
                extras.append(("mm", item.identifier, item.offset - start))
        if start == 0 and self.cache_salt:
            extras.append(("cache_salt", self.cache_salt))
        return extras


NO_EXTRAS = KeyExtras()


class Uncovered(ValueError):
    """A request whose KV depends on something the chunk keys cannot name exactly."""


def request_key_extras(request: Any) -> KeyExtras:
    """The `KeyExtras` of a vLLM `Request` (read by attribute, so this module needs no vLLM),
    from the fields vLLM's block hash reads; raises `Uncovered` for prompt embeddings, and for
    a multimodal item without a hash."""
    if getattr(request, "prompt_embeds", None) is not None:
        raise Uncovered("prompt embeddings")
    lora = getattr(request, "lora_request", None)
    multimodal = []
    for feature in getattr(request, "mm_features", None) or ():
        if feature.identifier is None:
            raise Uncovered("a multimodal input without a hash")
        position = feature.mm_position
        multimodal.append(MultimodalItem(feature.identifier, position.offset, position.length))
    return KeyExtras(
        lora=(lora.lora_name, lora.lora_path) if lora else None,
        cache_salt=getattr(request, "cache_salt", None) or None,
        multimodal=tuple(multimodal),
    )


def chunk_keys(
    identity: KeyIdentity, token_ids: Sequence[int], extras: KeyExtras = NO_EXTRAS
) -> list[str]:
    """Hex keys for every chunk of `token_ids`, in order."""
    tokens = np.asarray(token_ids, dtype="<i4")
    keys: list[str] = []
    previous = identity.seed()
    for start, end in chunk_spans(len(tokens), identity.chunk_size):
        digest = hashlib.blake2b(previous, digest_size=DIGEST_BYTES)
        digest.update((end - start).to_bytes(4, "little"))
        digest.update(tokens[start:end].tobytes())
        if tagged := extras.for_chunk(start, end):
            digest.update(json.dumps(tagged, ensure_ascii=False, separators=(",", ":")).encode())
        previous = digest.digest()
        keys.append(previous.hex())
    return keys
