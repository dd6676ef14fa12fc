"""`bash scripts/gpu_check.sh`: the connector's GPU data path, on a GPU machine without vLLM.

It needs PyTorch (CUDA), numpy, psutil, xxhash, PyYAML, aiohttp and prometheus-client, and
imports nothing else: no vLLM (vLLM 0.32's allocations come from `gpu_layouts.json`), no
network. Three parts, one JSON (`--json`, default `runs/gpu-check.json`):

- layouts: every probed allocation in `gpu_layouts.json` rebuilt as CUDA tensors, the adapter
  that `layout_for` picks for it reading each probed position where vLLM's own views put it,
  writing it back there, and touching nothing else.
- transfer: a 7B-shaped model's KV (32 layers, 8 KV heads of 128, bf16) for a 1,500-token prompt
  in 256-token chunks (the config's default), under every layout: the saver's device-to-host
  path (`gather`, `to_host`, `copies_done`), naive payloads put into a real store over shared
  memory (in this process, its arena prefaulted), gets read in place and the loader's
  host-to-device path (`DeviceOrder`, `scatter`); against a plain `copy_` of the same bytes to
  and from pinned memory, the physical limit. The connector's `ChunkCodec` also seals each
  chunk (or checksums its layers) and may use the cachegen serde; those need cryptography and
  constriction, which a GPU machine lacks, so the check leaves them out and says so (`payload`).
- prefill: what a 7B prefill of the same 1,500 tokens costs on this GPU, timed as torch matmuls
  and attention of the model's shapes (norms, rotary and sampling left out).

Ratios (`ratios`, for vLLM's default layout on a GPU whose backends state no preference,
FlashAttention's): save and load GB/s over the plain copies' (goal >= 0.5), save + store + load
time over the prefill's (goal <= 0.05). `--dry-run` runs the same code on the CPU with tiny
shapes, so CI keeps it working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from splitwise_bench.report import print_table, write_json
from splitwise_local.connector import gpu_layouts
from splitwise_local.connector.device import DeviceOrder, copies_done, to_host
from splitwise_local.connector.gpu_layouts import CarriedLayout, Case
from splitwise_local.connector.layout import LayerCaches, PagedLayout, layout_for, slots_for
from splitwise_local.serde.base import read_payload
from splitwise_local.serde.naive import NaiveSerde
from splitwise_local.store.client import ShmClient
from splitwise_local.store.server import ServerSettings, StoreServer

DEFAULT_LAYOUT = "LBNHC"  # vLLM's first choice when no attention backend states one
NAIVE = NaiveSerde()
# What the check leaves out of the connector's path, because a GPU machine lacks its packages.
PAYLOAD = {
    "serde": "naive",
    "sealed": False,
    "layer_checksums": False,
    "left_out": "ChunkCodec's AES-GMAC seal or per-layer xxh3 checksums (cryptography) and the "
    "cachegen serde (constriction)",
}
GOALS = {"save_over_copy": (">=", 0.5), "load_over_copy": (">=", 0.5),
         "e2e_over_prefill": ("<=", 0.05)}  # fmt: skip


@dataclass(frozen=True)
class Model:
    """The shapes a prefill's cost and a KV cache's size depend on."""

    layers: int
    kv_heads: int
    head_size: int
    heads: int
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class Setup:
    model: Model
    tokens: int
    chunk: int
    repeats: int


SEVEN_B = Setup(Model(32, 8, 128, 32, 4096, 14336), tokens=1500, chunk=256, repeats=5)
TINY = Setup(Model(3, 2, 8, 4, 16, 32), tokens=90, chunk=32, repeats=2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action: Callable[[], Any]) -> float:
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def median_time(device: torch.device, action: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` runs after one untimed run (allocator caches, kernel set-up)."""
    action()
    return statistics.median(timed(device, action) for _ in range(repeats))


def adapter(case: Case, caches: list[torch.Tensor], kv_cache_layout: CarriedLayout) -> PagedLayout:
    """On a GPU the connector's own choice (`layout_for`). A dry run's CPU tensors get the same
    adapter directly: on the CPU, `layout_for` picks the packing of vLLM's CPU attention."""
    if caches[0].device.type == "cpu":
        kv, heads = (1, 1) if case.mla else (2, case.heads)
        return PagedLayout(heads, case.head_size, case.block_size, kv_cache_layout.name, kv)
    layout = layout_for(caches[0], kv_cache_layout=kv_cache_layout, use_mla=case.mla,
                        heads=case.heads, head_size=case.head_size,
                        block_size=case.block_size)  # fmt: skip
    if not isinstance(layout, PagedLayout):
        raise AssertionError(f"layout_for chose {layout.name} for a {caches[0].device} cache")
    return layout


def check_layout(
    entry: dict[str, Any], layouts: dict[str, CarriedLayout], device: torch.device
) -> dict[str, Any]:
    """The probed positions read, written back, and nothing else written."""
    case = Case(**entry["case"])
    caches = gpu_layouts.rebuild(entry, device)
    layout = adapter(case, caches, layouts[case.layout])
    buffer = gpu_layouts.whole_buffer(caches[0])
    layer, slot, head, kv, channel, offset = torch.tensor(entry["probes"]).T
    count = len(offset)
    values = torch.arange(1, count + 1).to(buffer.dtype)  # exact in bf16 up to 256
    offsets = offset.to(device)
    buffer[offsets] = values.to(device)
    rows = layout.gather(LayerCaches(caches), slot)
    read = rows[layer.to(device), kv.to(device), torch.arange(count, device=device),
                head.to(device), channel.to(device)].cpu()  # fmt: skip

    slots, index = torch.unique(slot, return_inverse=True)
    written = torch.zeros(rows.shape[0], rows.shape[1], len(slots), *rows.shape[3:],
                          dtype=buffer.dtype)  # fmt: skip
    written[layer, kv, index, head, channel] = values
    buffer.zero_()
    layout.scatter(LayerCaches(caches), slots, written)
    landed = buffer[offsets].cpu()
    return {
        "case": case.key,
        "adapter": layout.name,
        "gather": torch.equal(read, values),
        "scatter": torch.equal(landed, values) and int(torch.count_nonzero(buffer)) == count,
    }


@dataclass
class Moves:
    """One prompt's KV under one layout, and the connector's three moves of it: the saver's
    gather and device-to-host copy, the put of naive payloads into the store, and the
    loader's in-place get, decode and host-to-device scatter."""

    layout: PagedLayout
    source: LayerCaches
    target: LayerCaches
    slots: list[torch.Tensor]
    keys: list[str]
    client: ShmClient
    held: list[torch.Tensor] = field(default_factory=list)

    def save(self) -> None:
        self.held[:] = [to_host(self.layout.gather(self.source, s)) for s in self.slots]
        done = copies_done(self.source.device)
        if done is not None:
            done.synchronize()

    def store(self) -> None:
        payloads = [NAIVE.encode(rows) for rows in self.held]
        self.client.put_many(list(zip(self.keys, payloads, strict=True)))

    def load(self) -> None:
        order = DeviceOrder(self.target.device)
        with order.copies(order.mark()) as landed:
            self.client.get_into(self.keys, self._land)
        if landed:
            landed[0].synchronize()

    def _land(self, index: int, value: memoryview | None) -> None:
        if value is None:
            raise RuntimeError(f"{self.keys[index]} is missing from the store")
        rows, _ = NaiveSerde.decode_checked(*read_payload(value), "cpu")
        if rows.shape != self.held[index].shape:
            raise RuntimeError(f"{self.keys[index]} holds {tuple(rows.shape)}")
        self.layout.scatter(self.target, self.slots[index], rows)

    def forget(self) -> None:
        for key in self.keys:
            self.client.delete(key)


def moves_for(
    entry: dict[str, Any],
    layouts: dict[str, CarriedLayout],
    device: torch.device,
    setup: Setup,
    client: ShmClient,
) -> Moves:
    """`setup`'s prompt in random blocks of `entry`'s allocation, its source KV random."""
    case = Case(**entry["case"])
    source, target = gpu_layouts.rebuild(entry, device), gpu_layouts.rebuild(entry, device)
    gpu_layouts.whole_buffer(source[0]).uniform_(1, 2)
    generator = torch.Generator().manual_seed(0)
    blocks = -(-setup.tokens // case.block_size)
    table = torch.randperm(case.num_blocks, generator=generator)[:blocks].tolist()
    spans = [(s, min(s + setup.chunk, setup.tokens)) for s in range(0, setup.tokens, setup.chunk)]
    return Moves(
        adapter(case, source, layouts[case.layout]),
        LayerCaches(source),
        LayerCaches(target),
        [slots_for(table, start, end, case.block_size) for start, end in spans],
        [f"{case.key}-{i}" for i in range(len(spans))],
        client,
    )


def transfer(moves: Moves, repeats: int) -> dict[str, Any]:
    """Save, store and load one prompt's KV through the connector's own functions, timed."""
    device = moves.source.device
    times: dict[str, list[float]] = {"save": [], "store": [], "load": []}
    for attempt in range(repeats + 1):  # the first warms caches and allocators
        for name, action in (("save", moves.save), ("store", moves.store), ("load", moves.load)):
            took = timed(device, action)
            if attempt:
                times[name].append(took)
        moves.forget()
    every = torch.cat(moves.slots)
    layout, source, target = moves.layout, moves.source, moves.target
    verified = torch.equal(layout.gather(target, every), layout.gather(source, every))
    written = int(torch.count_nonzero(gpu_layouts.whole_buffer(target.layers[0])))
    nbytes = sum(rows.numel() * rows.element_size() for rows in moves.held)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "layout": layout.kv_cache_layout,
        "adapter": layout.name,
        "bytes": nbytes,
        **{f"{name}_s": value for name, value in seconds.items()},
        "save_gbps": nbytes / seconds["save"] / 1e9,
        "load_gbps": nbytes / seconds["load"] / 1e9,
        "e2e_s": sum(seconds.values()),
        "verified": verified and written * source.layers[0].element_size() == nbytes,
    }


def plain_copies(nbytes: int, device: torch.device, repeats: int) -> dict[str, float]:
    """GB/s of one `copy_` of `nbytes` each way between the device and pinned host memory (and,
    for comparison, to the device from ordinary memory)."""
    pinned = device.type == "cuda"
    on_device = torch.ones(nbytes, dtype=torch.uint8, device=device)
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    copies = {
        "d2h_pinned": lambda: host.copy_(on_device, non_blocking=True),
        "h2d_pinned": lambda: on_device.copy_(host, non_blocking=True),
        "h2d_pageable": lambda: on_device.copy_(pageable),
    }
    return {f"{name}_gbps": nbytes / median_time(device, copy, repeats) / 1e9
            for name, copy in copies.items()}  # fmt: skip


def prefill_seconds(model: Model, tokens: int, device: torch.device, repeats: int) -> float:
    """One prefill of `tokens` through `model`'s layers: its projections, causal attention with
    grouped KV heads, and gated MLP, in bf16."""

    def weight(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, device=device, dtype=torch.bfloat16) * 0.02

    q_width, kv_width = model.heads * model.head_size, model.kv_heads * model.head_size
    qkv = weight(model.hidden, q_width + 2 * kv_width)
    out = weight(q_width, model.hidden)
    gate_up = weight(model.hidden, 2 * model.intermediate)
    down = weight(model.intermediate, model.hidden)
    x = torch.randn(tokens, model.hidden, device=device, dtype=torch.bfloat16)

    def heads(t: torch.Tensor, count: int) -> torch.Tensor:
        return t.view(1, tokens, count, model.head_size).transpose(1, 2)

    def forward() -> None:
        h = x
        for _ in range(model.layers):
            q, k, v = torch.split(h @ qkv, [q_width, kv_width, kv_width], dim=-1)
            attention = F.scaled_dot_product_attention(
                heads(q, model.heads), heads(k, model.kv_heads), heads(v, model.kv_heads),
                is_causal=True, enable_gqa=True,
            )  # fmt: skip
            h = h + attention.transpose(1, 2).reshape(tokens, q_width) @ out
            gate, up = (h @ gate_up).chunk(2, dim=-1)
            h = h + (F.silu(gate) * up) @ down

    with torch.inference_mode():
        return median_time(device, forward, repeats)


def describe_device(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {
            "name": props.name,
            "memory_gb": round(props.total_memory / 1024**3, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return facts


def run_check(setup: Setup, device: torch.device) -> dict[str, Any]:
    data = gpu_layouts.load()
    layouts = gpu_layouts.layouts(data)
    checks = [check_layout(e, layouts, device) for e in data["cases"] if e["probes"]]
    model = setup.model
    wanted = {"layers": model.layers, "heads": model.kv_heads, "head_size": model.head_size,
              "block_size": 16, "mla": False, "kernel_block_size": None}  # fmt: skip
    entries = [e for e in data["cases"]
               if all(e["case"][k] == v for k, v in wanted.items())]  # fmt: skip
    kv_bytes = setup.tokens * model.layers * 2 * model.kv_heads * model.head_size * 2
    server = StoreServer(
        ServerSettings(capacity=3 * kv_bytes + (64 << 20), port=0, prefault=True)
    ).start()
    client = ShmClient(server.shm_name)
    try:
        transfers = [transfer(moves_for(e, layouts, device, setup, client), setup.repeats)
                     for e in entries]  # fmt: skip
    finally:
        client.close()
        server.stop()
    copies = plain_copies(kv_bytes, device, setup.repeats)
    prefill = prefill_seconds(model, setup.tokens, device, setup.repeats)
    main = next(t for t in transfers if t["layout"] == DEFAULT_LAYOUT)
    ratios = {
        "save_over_copy": main["save_gbps"] / copies["d2h_pinned_gbps"],
        "load_over_copy": main["load_gbps"] / copies["h2d_pinned_gbps"],
        "e2e_over_prefill": main["e2e_s"] / prefill,
    }
    met = {name: value >= goal if sign == ">=" else value <= goal
           for name, (sign, goal) in GOALS.items() for value in [ratios[name]]}  # fmt: skip
    return {
        "mode": "dry-run" if device.type == "cpu" else "gpu",
        "device": describe_device(device),
        "vllm_layouts_from": data["vllm"],
        "setup": asdict(setup),
        "default_layout": DEFAULT_LAYOUT,
        "payload": PAYLOAD,
        "layout_checks": checks,
        "transfers": transfers,
        "copies": copies,
        "prefill_s": prefill,
        "ratios": ratios,
        "goals": {name: f"{sign} {goal}" for name, (sign, goal) in GOALS.items()},
        "met": met,
        "passed": all(c["gather"] and c["scatter"] for c in checks)
        and all(t["verified"] for t in transfers),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on the CPU with tiny shapes (CI)")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="the GPU to check (default: cuda)")
    parser.add_argument("--json", default="runs/gpu-check.json", help="where to write results")


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        setup, device = TINY, torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to exercise it on the CPU)")
        return 2
    else:
        setup, device = SEVEN_B, torch.device(args.device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    results = run_check(setup, device)
    failed = [c["case"] for c in results["layout_checks"] if not (c["gather"] and c["scatter"])]
    print_table(
        f"layouts on {device}: {len(results['layout_checks']) - len(failed)} of "
        f"{len(results['layout_checks'])} allocations read and written as vLLM's views do",
        ["case", "adapter", "gather", "scatter"],
        [[c["case"], c["adapter"], c["gather"], c["scatter"]] for c in results["layout_checks"]
         if c["case"] in failed] or [["all", "", True, True]],
    )  # fmt: skip
    print_table(
        f"{setup.tokens} tokens of KV ({results['transfers'][0]['bytes'] / 1e6:.1f} MB), "
        f"{PAYLOAD['serde']} payloads, unsealed, no layer checksums",
        ["layout", "save GB/s", "store s", "load GB/s", "e2e s", "verified"],
        [[t["layout"], t["save_gbps"], t["store_s"], t["load_gbps"], t["e2e_s"], t["verified"]]
         for t in results["transfers"]],
    )  # fmt: skip
    copies = results["copies"]
    print_table(
        "plain copies and the prefill",
        ["d2h pinned GB/s", "h2d pinned GB/s", "h2d pageable GB/s", "prefill s"],
        [[copies["d2h_pinned_gbps"], copies["h2d_pinned_gbps"], copies["h2d_pageable_gbps"],
          results["prefill_s"]]],
    )  # fmt: skip
    print_table(
        f"ratios ({DEFAULT_LAYOUT})",
        ["ratio", "value", "goal", "met"],
        [[name, value, results["goals"][name], results["met"][name]]
         for name, value in results["ratios"].items()],
    )  # fmt: skip
    write_json(args.json, results)
    return 0 if results["passed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
