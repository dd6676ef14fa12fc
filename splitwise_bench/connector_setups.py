"""The connector setups `bench connector` measures: how each one's engines start, how its decode
engine tells of a load, and what the decode request carries from the prefill answer.

`splitwise` is ours; `example` is vLLM's in-tree `ExampleConnector` (one safetensors file per
layer and prompt, on tmpfs here); `nixl` is vLLM's `NixlConnector` with its KV buffer in host
memory (UCX; needs the `nixl` package, the `bench` extra). Another connector is measured by adding
a `Setup` to `SETUPS`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from splitwise_local.config import SplitwiseConfig
from splitwise_local.serve.ports import free_port
from splitwise_testing.system import Engine, System, start_system

LOAD_LINE = re.compile(r"splitwise load req=\S+ tokens=(\d+) chunks=(\d+) bytes=(\d+) ms=([\d.]+)")
EXAMPLE_LOAD_LINE = re.compile(r"Inject KV cache of (\d+) tokens to the paged memory")


@dataclass(frozen=True)
class Load:
    """One load as the decode engine logged it; `ms` is None when the connector does not time
    its loads (its GB/s is then not measured)."""

    tokens: int
    bytes: int
    ms: float | None


class LoadReport(Protocol):
    """How a setup's decode engine tells of its loads: `mark` notes what it has told so far,
    `loads` gives those it told of since that mark."""

    def mark(self, decode: Engine) -> object: ...

    def loads(self, decode: Engine, model: Path, mark: object) -> list[Load]: ...


@dataclass(frozen=True)
class LogLoads:
    """Loads the decode engine logs, one line each, parsed by `parse(match, model)`."""

    line: re.Pattern[str]
    parse: Callable[[re.Match[str], Path], Load]

    def mark(self, decode: Engine) -> object:
        return decode.new_log()

    def loads(self, decode: Engine, model: Path, mark: object) -> list[Load]:
        text = decode.wait_log(self.line.pattern)
        return [self.parse(match, model) for match in self.line.finditer(text)]


class NixlLoads:
    """NIXL logs no load at INFO level but counts, sizes and times its transfers in the decode
    engine's Prometheus histograms; the tokens are the engine's external prefix-cache hits."""

    COUNTERS = (
        "vllm:nixl_xfer_time_seconds_count",
        "vllm:nixl_xfer_time_seconds_sum",
        "vllm:nixl_bytes_transferred_sum",
        "vllm:external_prefix_cache_hits_total",
    )

    def mark(self, decode: Engine) -> object:
        return decode.metrics(*self.COUNTERS)

    def loads(self, decode: Engine, model: Path, mark: object) -> list[Load]:
        # The engine publishes connector stats with its step stats, a moment after the reply.
        deadline = time.monotonic() + 15
        while True:
            now = decode.metrics(*self.COUNTERS)
            count, seconds, size, tokens = (b - a for a, b in zip(mark, now, strict=True))
            if count > 0:
                return [Load(int(tokens), int(size), seconds * 1e3)]
            if time.monotonic() > deadline:
                return []
            time.sleep(0.2)


def _looked_up(prefill: Engine, prompt: list[int]) -> dict:
    """The decode engine finds the KV the prefill engine stored by itself: the decode request
    is the prompt alone."""
    return {}


@dataclass(frozen=True)
class Setup:
    """One connector configuration under test.

    `start(root, model, args)` returns a running `System` with engines named "prefill" and
    "decode"; `report` reads the decode engine's loads; `handoff(prefill, prompt)`, called
    after the prefill engine has answered `prompt`, gives the extra fields of the decode request
    that loads its KV (what a proxy would pass on).
    """

    name: str
    start: Callable
    report: LoadReport
    handoff: Callable[[Engine, list[int]], dict] = _looked_up


def _start_splitwise(root: Path, model: Path, args: argparse.Namespace) -> System:
    config = SplitwiseConfig(
        chunk_size=args.chunk_size, remote_serde=args.serde, max_local_cpu_size=2
    )
    return start_system(root, model, config, {"prefill": "prefill", "decode": "decode"})


def _splitwise_load(match: re.Match[str], model: Path) -> Load:
    return Load(int(match[1]), int(match[3]), float(match[4]))


def _start_peer(
    root: Path, model: Path, configs: dict[str, dict], env: dict[str, dict[str, str]] | None = None
) -> System:
    """Plain engines (to our code) that vLLM gives a connector through its own
    `--kv-transfer-config`, one config per engine name."""
    flags = {name: ["--kv-transfer-config", json.dumps(c)] for name, c in configs.items()}
    roles = dict.fromkeys(configs, "plain")
    return start_system(root, model, None, roles, engine_args=flags, engine_env=env)


def _start_example(root: Path, model: Path, args: argparse.Namespace) -> System:
    """vLLM's ExampleConnector, 1P1D, unchanged. Its files go to a folder on tmpfs (RAM, like
    our store), removed when the system stops."""
    storage = Path(tempfile.mkdtemp(prefix="splitwise-example-", dir="/dev/shm"))
    configs = {
        name: {"kv_connector": "ExampleConnector", "kv_role": role,
               "kv_connector_extra_config": {"shared_storage_path": str(storage)}}
        for name, role in (("prefill", "kv_producer"), ("decode", "kv_consumer"))
    }  # fmt: skip
    try:
        system = _start_peer(root, model, configs)
    except BaseException:
        shutil.rmtree(storage, ignore_errors=True)
        raise
    system.cleanups.append(lambda: shutil.rmtree(storage, ignore_errors=True))
    return system


def _example_load(match: re.Match[str], model: Path) -> Load:
    """ExampleConnector logs the tokens it injects, not bytes or time: bytes are those tokens'
    KV (the payload of the files it reads)."""
    layers, heads, head_size = kv_geometry(model)
    tokens = int(match[1])
    return Load(tokens, tokens * layers * 2 * heads * head_size * 2, None)  # K and V, bf16


def _start_nixl(root: Path, model: Path, args: argparse.Namespace) -> System:
    """vLLM's NixlConnector, 1P1D, its KV buffer in host memory (`kv_buffer_device: cpu`,
    moved by UCX); each engine gets its own side-channel port for the handshake."""
    configs = {
        name: {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
        for name, role in (("prefill", "kv_producer"), ("decode", "kv_consumer"))
    }
    env = {name: {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())} for name in configs}
    return _start_peer(root, model, configs, env)


def _nixl_handoff(prefill: Engine, prompt: list[int]) -> dict:
    """NIXL's decode engine pulls the blocks that the prefill engine holds for one request:
    prefill computes the prompt again asked to keep them, and answers with their address."""
    asked = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
             "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
    reply = prefill.complete(prompt, max_tokens=1, kv_transfer_params=asked)
    return {"kv_transfer_params": reply["kv_transfer_params"]}


SETUPS: dict[str, Setup] = {
    "splitwise": Setup("splitwise", _start_splitwise, LogLoads(LOAD_LINE, _splitwise_load)),
    "example": Setup("example", _start_example, LogLoads(EXAMPLE_LOAD_LINE, _example_load)),
    "nixl": Setup("nixl", _start_nixl, NixlLoads(), _nixl_handoff),
}


def kv_geometry(model: Path) -> tuple[int, int, int]:
    """Layers, KV heads and head size of a per-head-attention checkpoint."""
    from transformers import AutoConfig  # heavy: only a run needs it, not `bench --help`

    hf = AutoConfig.from_pretrained(model)
    return hf.num_hidden_layers, hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
