"""`bench serde`: size, speed and model quality of the KV serdes, on real KV of the embedded model.

For each setting (`naive`, `kivi-2/4/8`, `cachegen`, and extra `cachegen-B` resolutions):
- ratio: bf16 bytes of the KV over the payload bytes, headers and metadata included;
- encode and decode throughput in GB/s of original KV, against a memcpy of the same chunks into
  buffers allocated once (best of `--repeats` rounds). By default torch runs one thread (one
  CPU core), and the clock is that thread's CPU time, so that other processes on a
  shared machine do not count against either side; with more threads or on CUDA it is wall time.
  For `naive`, `encode` returns new bytes (whose fresh pages fault in, one by one) and
  `encode_into` writes into a reused buffer, as a store slot is: both are reported;
- error: relative L2 error per layer;
- quality: the prompt's KV goes through the serde, then a reference continuation (the model's
  own greedy continuation from the original KV) is teacher-forced: `agreement` is the fraction of
  positions whose next-token argmax matches the one with the original KV, `delta_loglik` the
  change in mean log-likelihood of the reference tokens. The model runs in float32 here so that
  bf16 logit rounding does not decide near-ties; the KV itself stays bf16, as vLLM stores it.
  `near_ties` counts the positions where the original model itself split its top two tokens
  by less than 5% of probability, and `agreement_without_near_ties` leaves them out: on a
  135M-parameter model those positions decide most disagreements.
Greedy first divergence through the real decode engine needs the connector: `bench connector`.

torch (and the serdes, built on it) is imported inside the functions that use it: `bench --help`
imports every benchmark module and should not pay for it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from splitwise_bench import report
from splitwise_local.config import SerdeOptions
from splitwise_local.progress import Progress
from splitwise_testing import kv_capture
from splitwise_testing.kv_capture import kv_to_cache

GOALS = {
    "naive_vs_memcpy": 0.8,
    "kivi4_ratio": 3.5,
    "kivi4_agreement": 0.98,
    "kivi2_ratio": 6.0,
    "cachegen_vs_kivi_ratio": 1.3,
    "kivi_gbps": 1.0,
    "cachegen_decode_gbps": 0.1,
}
NEAR_TIE = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=5, help="real prompts to capture KV from")
    parser.add_argument("--continuation", type=int, default=48, help="teacher-forced tokens")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--group-size", type=int, default=None, help="serde group size")
    parser.add_argument(
        "--cachegen-bits",
        type=int,
        nargs="*",
        default=[2, 3, 5],
        help="extra cachegen resolutions, reported as cachegen-B",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one core)")
    parser.add_argument("--device", default="cpu", help="where the KV tensors live: cpu or cuda")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded one)")


@dataclass
class Case:
    """One prompt: its KV in chunks (all but the last prompt token) and what to continue with."""

    chunks: list  # [layers, 2, <=chunk_size, heads, head_size] bf16 on the bench device
    last_token: Any  # the prompt's last token id, fed first when teacher-forcing
    continuation: Any  # reference continuation token ids
    base_logits: Any  # teacher-forced logits with the original KV


def settings(group_size: int, default_bits: int, cachegen_bits: Sequence[int]) -> dict[str, Any]:
    from splitwise_local.serde import CacheGenSerde, KiviSerde, NaiveSerde

    chosen: dict[str, Any] = {"naive": NaiveSerde()}
    for bits in (2, 4, 8):
        chosen[f"kivi-{bits}"] = KiviSerde(bits=bits, group_size=group_size)
    chosen["cachegen"] = CacheGenSerde(bits=default_bits, group_size=group_size)
    for bits in cachegen_bits:
        if bits != default_bits:
            chosen[f"cachegen-{bits}"] = CacheGenSerde(bits=bits, group_size=group_size)
    return chosen


def teacher_forced(model, kv, last_token, continuation):
    """Logits for each continuation position, given the prompt's KV."""
    import torch

    inputs = torch.cat([last_token.view(1), continuation[:-1]]).unsqueeze(0)
    with torch.inference_mode():
        out = model(input_ids=inputs, past_key_values=kv_to_cache(kv.float()), use_cache=True)
    return out.logits[0].float()


def greedy(model, kv, last_token, steps: int):
    """The model's own continuation from `kv`, one token at a time."""
    import torch

    cache, token, out = kv_to_cache(kv.float()), last_token.view(1, 1), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token.item())
    return torch.tensor(out)


def prepare_cases(args: argparse.Namespace, device) -> tuple[Any, list[Case]]:
    model, tokenizer = kv_capture.load_model(args.model)
    captured = [
        kv_capture.capture(model, kv_capture.tokenize(tokenizer, text))
        for text in kv_capture.prompt_texts(args.prompts)
    ]
    model = model.float()  # quality runs in float32; the captured KV stays bf16
    cases = []
    for prompt in captured:
        kv = prompt.kv[:, :, :-1]  # the last prompt token is recomputed, as the decode engine does
        last = prompt.input_ids[-1]
        continuation = greedy(model, kv, last, args.continuation)
        chunks = [c.to(device) for c in kv_capture.split_chunks(kv, args.chunk_size)]
        cases.append(
            Case(chunks, last, continuation, teacher_forced(model, kv, last, continuation))
        )
    return model, cases


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device, rounds: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        best = min(best, clock() - start)
    return best


def memcpy_seconds(chunks: list, timer: Callable[[Callable[[], Any]], float]) -> float:
    """The baseline: the same chunks copied into buffers allocated once."""
    import torch

    targets = [torch.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for src, dst in zip(chunks, targets, strict=True):
            dst.copy_(src)

    return timer(memcpy)


def layer_errors(original: list, decoded: list) -> list[float]:
    """Relative L2 error of each layer over all chunks."""
    import torch

    num = torch.zeros(original[0].shape[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for x, y in zip(original, decoded, strict=True):
        dims = tuple(range(1, x.dim()))
        num += ((y.double() - x.double()) ** 2).sum(dims).cpu()
        den += (x.double() ** 2).sum(dims).cpu()
    return (num / den).sqrt().tolist()


def quality(model, cases: list[Case], decoded: list[list]) -> dict[str, float]:
    import torch

    agree = positions = confident_agree = confident = 0
    delta = 0.0
    for case, chunks in zip(cases, decoded, strict=True):
        logits = teacher_forced(
            model, torch.cat(chunks, dim=2).cpu(), case.last_token, case.continuation
        )
        same = logits.argmax(-1) == case.base_logits.argmax(-1)
        clear = ~tie_mask(case)
        agree += int(same.sum())
        confident_agree += int((same & clear).sum())
        confident += int(clear.sum())
        positions += len(case.continuation)
        ref = case.continuation[:, None]
        new = torch.log_softmax(logits, -1).gather(1, ref).mean()
        old = torch.log_softmax(case.base_logits, -1).gather(1, ref).mean()
        delta += float(new - old) * len(case.continuation)
    return {
        "agreement": agree / positions,
        "agreement_without_near_ties": confident_agree / max(confident, 1),
        "delta_loglik": delta / positions,
    }


def tie_mask(case: Case):
    """Positions where the original model's top two tokens are within NEAR_TIE probability."""
    import torch

    top = torch.softmax(case.base_logits, -1).topk(2, -1).values
    return (top[:, 0] - top[:, 1]) < NEAR_TIE


def near_ties(cases: list[Case]) -> tuple[int, int]:
    return sum(int(tie_mask(c).sum()) for c in cases), sum(len(c.continuation) for c in cases)


def measure(name: str, serde, cases: list[Case], model, timer: Callable, memcpy_s: float) -> dict:
    """Size, speed, error and quality of one serde setting."""
    chunks = [c for case in cases for c in case.chunks]
    original_bytes = sum(c.numel() * 2 for c in chunks)  # against bf16, whatever the KV dtype
    payloads = [serde.encode(c) for c in chunks]
    device = chunks[0].device
    decoded_flat = [serde.decode(p, device)[0] for p in payloads]
    encode_s = timer(lambda: [serde.encode(c) for c in chunks])
    decode_s = timer(lambda: [serde.decode(p, device) for p in payloads])
    errors = layer_errors(chunks, decoded_flat)
    decoded, at = [], 0
    for case in cases:
        decoded.append(decoded_flat[at : at + len(case.chunks)])
        at += len(case.chunks)
    moved = sum(c.numel() * c.element_size() for c in chunks)
    result = {
        "ratio": original_bytes / sum(len(p) for p in payloads),
        "encode_gbps": moved / encode_s / 1e9,
        "decode_gbps": moved / decode_s / 1e9,
        "encode_vs_memcpy": memcpy_s / encode_s,
        "decode_vs_memcpy": memcpy_s / decode_s,
        "encode_decode_vs_memcpy": memcpy_s / (encode_s + decode_s),
        "rel_l2_mean": sum(errors) / len(errors),
        "rel_l2_max": max(errors),
        "rel_l2_per_layer": errors,
        **quality(model, cases, decoded),
    }
    if hasattr(serde, "encode_into"):
        slots = [bytearray(len(p)) for p in payloads]
        into_s = timer(
            lambda: [serde.encode_into(c, b) for c, b in zip(chunks, slots, strict=True)]
        )
        result["encode_into_gbps"] = moved / into_s / 1e9
        result["encode_into_decode_vs_memcpy"] = memcpy_s / (into_s + decode_s)
    print(f"  {name}: ratio {result['ratio']:.2f}, agreement {result['agreement']:.3f}", flush=True)
    return result


def cachegen_ratio_at(agreement: float, points: list[dict]) -> float | None:
    """CacheGen's best ratio at `agreement` or better: a measured setting that reaches it, or
    the straight line between the two settings, adjacent in agreement, that bracket it."""
    best = max((p["ratio"] for p in points if p["agreement"] >= agreement), default=None)
    ordered = sorted(points, key=lambda p: p["agreement"])
    for low, high in itertools.pairwise(ordered):
        if low["agreement"] < agreement <= high["agreement"] and low["ratio"] > high["ratio"]:
            t = (agreement - low["agreement"]) / (high["agreement"] - low["agreement"])
            line = low["ratio"] + t * (high["ratio"] - low["ratio"])
            best = line if best is None else max(best, line)
    return best


def goal_rows(serdes: dict[str, dict]) -> list[list[Any]]:
    """Each goal, the measured value and whether it is met."""
    kivi = {k: v for k, v in serdes.items() if k.startswith("kivi-")}
    cachegens = {k: v for k, v in serdes.items() if k.startswith("cachegen")}
    best_gain, best_pair = 0.0, "none"
    for kname, k in kivi.items():
        ratio = cachegen_ratio_at(k["agreement"], list(cachegens.values()))
        if ratio is not None and ratio / k["ratio"] > best_gain:
            best_gain, best_pair = ratio / k["ratio"], kname
    rows = [
        [
            "naive enc+dec vs memcpy (encode to new bytes)",
            serdes["naive"]["encode_decode_vs_memcpy"],
            GOALS["naive_vs_memcpy"],
        ],
        [
            "naive enc+dec vs memcpy (encode_into a reused buffer)",
            serdes["naive"]["encode_into_decode_vs_memcpy"],
            GOALS["naive_vs_memcpy"],
        ],
        ["kivi-4 ratio", serdes["kivi-4"]["ratio"], GOALS["kivi4_ratio"]],
        ["kivi-4 agreement", serdes["kivi-4"]["agreement"], GOALS["kivi4_agreement"]],
        ["kivi-2 ratio", serdes["kivi-2"]["ratio"], GOALS["kivi2_ratio"]],
        [
            f"cachegen/kivi ratio at equal agreement (vs {best_pair})",
            best_gain,
            GOALS["cachegen_vs_kivi_ratio"],
        ],
        [
            "kivi min(enc, dec) GB/s",
            min(min(k["encode_gbps"], k["decode_gbps"]) for k in kivi.values()),
            GOALS["kivi_gbps"],
        ],
        ["cachegen decode GB/s", serdes["cachegen"]["decode_gbps"], GOALS["cachegen_decode_gbps"]],
    ]
    return [[name, value, goal, "yes" if value >= goal else "NO"] for name, value, goal in rows]


def headline_ratios(serdes: dict[str, dict], goals: list[list[Any]]) -> dict[str, float]:
    """Each setting's size (bf16 bytes over payload bytes) and encode+decode speed against a
    memcpy of the same chunks, naive's into a reused buffer, and CacheGen's size gain over the
    KIVI setting it best matches in agreement."""
    ratios: dict[str, float] = {}
    for name, result in serdes.items():
        key = name.replace("-", "")
        ratios[f"{key}_bf16_over_payload_bytes"] = result["ratio"]
        ratios[f"{key}_encode_decode_vs_memcpy"] = result["encode_decode_vs_memcpy"]
    ratios["naive_encode_into_decode_vs_memcpy"] = serdes["naive"]["encode_into_decode_vs_memcpy"]
    gain = next(row for row in goals if row[0].startswith("cachegen/kivi"))
    ratios["cachegen_vs_kivi_size_at_equal_agreement"] = gain[1]
    return ratios


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = SerdeOptions()
    group_size = args.group_size or options.group_size
    started = time.perf_counter()
    model, cases = prepare_cases(args, device)
    ties, positions = near_ties(cases)
    print(
        f"{len(cases)} prompts, {sum(len(c.chunks) for c in cases)} chunks, {positions} "
        f"continuation positions ({ties} near-ties) in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    chunks = [c for case in cases for c in case.chunks]
    thread_clock = device.type == "cpu" and args.threads == 1
    clock = time.thread_time if thread_clock else time.perf_counter

    def timer(fn: Callable[[], Any]) -> float:
        return best_seconds(fn, device, args.repeats, clock)

    memcpy_s = memcpy_seconds(chunks, timer)
    memcpy_gbps = sum(c.numel() * c.element_size() for c in chunks) / memcpy_s / 1e9
    chosen = settings(group_size, options.bits, args.cachegen_bits)
    serdes = {
        name: measure(name, serde, cases, model, timer, memcpy_s)
        for name, serde in Progress(chosen.items(), desc="bench serde", unit="serde")
    }
    title = (
        f"serdes on {device.type}, {args.threads} thread(s), group {group_size}, "
        f"memcpy {memcpy_gbps:.2f} GB/s, clock: {clock.__name__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    goals = print_results(title, serdes)
    report.write_json(
        args.json,
        {
            "device": device.type,
            "threads": args.threads,
            "clock": clock.__name__,
            "load_average": os.getloadavg()[0],
            "group_size": group_size,
            "chunk_size": args.chunk_size,
            "prompts": len(cases),
            "positions": positions,
            "near_ties": ties,
            "memcpy_gbps": memcpy_gbps,
            "ratios": headline_ratios(serdes, goals),
            "serdes": serdes,
            "goals": {
                name: {"measured": v, "target": t, "met": m == "yes"} for name, v, t, m in goals
            },
        },
    )
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


def print_results(title: str, serdes: dict[str, dict]) -> list[list[Any]]:
    """The settings' table and the goals' table; returns the goals' rows."""
    headers = ["setting", "ratio", "enc GB/s", "dec GB/s", "enc+dec/memcpy", "L2 mean", "L2 max",
               "agreement", "agr. w/o ties", "d loglik"]  # fmt: skip
    keys = ["ratio", "encode_gbps", "decode_gbps", "encode_decode_vs_memcpy", "rel_l2_mean",
            "rel_l2_max", "agreement", "agreement_without_near_ties", "delta_loglik"]  # fmt: skip
    rows = [[name, *(r[key] for key in keys)] for name, r in serdes.items()]
    report.print_table(title, headers, rows)
    goals = goal_rows(serdes)
    report.print_table("goals", ["goal", "measured", "target", "met"], goals)
    return goals
