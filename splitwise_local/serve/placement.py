"""Where each engine runs: its GPUs (CUDA_VISIBLE_DEVICES) or its CPU cores (vLLM's OpenMP
binding), decided before anything starts.

Prefill and decode engines never share a GPU, and on the CPU they get cores of their own even
when there are fewer cores than engines: prefill work must not slow decoding, which is the point
of disaggregating. A placement that cannot be (GPUs that do not exist, overlap, or do not split
evenly) is a `PlacementError` with a one-line message for the user.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

GPU_LIST = re.compile(r"^\d+(,\d+)*$")
Placement = dict[str, str]  # {"gpus": "0,1"} or {"cpu_cores": "0"}: EngineSpec's fields


class PlacementError(ValueError):
    """Engines that cannot be placed as asked; the message is one line for the user."""


def split_cores(cores: list[int], prefill: int, decode: int) -> tuple[list[str], list[str]]:
    """Each engine's CPU cores (VLLM_CPU_OMP_THREADS_BIND), prefill engines first.

    With at least one core per engine, every engine gets its own contiguous cores, as evenly
    as they divide (the remainder goes to the last, decode, engines). With fewer cores than
    engines, prefill and decode still get cores of their own (in proportion to their engine
    counts; one shared core if there is only one), and the engines of a role share their
    role's cores, one core each in turn: prefill work never slows decoding, which is the
    point of disaggregating.
    """
    engines = prefill + decode
    if len(cores) >= engines:
        base, extra = divmod(len(cores), engines)
        groups, start = [], 0
        for i in range(engines):
            size = base + (i >= engines - extra)
            groups.append(",".join(map(str, cores[start : start + size])))
            start += size
        return groups[:prefill], groups[prefill:]
    if len(cores) == 1:
        return [str(cores[0])] * prefill, [str(cores[0])] * decode
    ours = min(max(1, round(len(cores) * prefill / engines)), len(cores) - 1)
    prefill_cores, decode_cores = cores[:ours], cores[ours:]
    return (
        [str(prefill_cores[i % len(prefill_cores)]) for i in range(prefill)],
        [str(decode_cores[i % len(decode_cores)]) for i in range(decode)],
    )


def gpu_list(option: str, value: str, count: int) -> list[int]:
    """The GPU numbers `option` names (`0,1`), each one this machine's `count` GPUs have."""
    if not GPU_LIST.match(value):
        raise PlacementError(f"{option} {value!r}: expected GPU numbers like 0 or 0,1")
    gpus = [int(gpu) for gpu in value.split(",")]
    if any(gpu >= count for gpu in gpus):
        message = f"this machine has {count} GPU(s) (numbered from 0)"
        raise PlacementError(f"{option} {value}: {message}")
    return gpus


def split_gpus(
    role: str, value: str | None, engines: int, tp: int | None, first: int, count: int
) -> list[str]:
    """Each engine's CUDA_VISIBLE_DEVICES: `value` (by default `engines * tp` GPUs from `first`
    on) split evenly between the role's engines."""
    option = f"--{role}-gpus"
    if value is None:
        value = ",".join(str(gpu) for gpu in range(first, first + engines * (tp or 1)))
    gpus = gpu_list(option, value, count)
    if len(gpus) % engines:
        raise PlacementError(
            f"{option} {value}: {len(gpus)} GPU(s) do not split evenly between "
            f"{engines} {role} engines"
        )
    each = len(gpus) // engines
    if tp is not None and each != tp:
        raise PlacementError(
            f"{option} {value}: {engines} {role} engine(s) with --tp {tp} need "
            f"{engines * tp} GPU(s), not {len(gpus)}"
        )
    return [",".join(map(str, gpus[i * each : (i + 1) * each])) for i in range(engines)]


def placement(
    args: argparse.Namespace, device: str, say: Callable[[str], None]
) -> dict[str, list[Placement]]:
    """Per role, each engine's GPUs (CUDA_VISIBLE_DEVICES) or CPU cores (OMP binding), for the
    launcher's `--prefill/--decode`, `--prefill-gpus/--decode-gpus` and `--tp`; `say` tells
    the user what on the CPU is ignored or shared."""
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        prefill = split_gpus("prefill", args.prefill_gpus, args.prefill, args.tp, 0, count)
        after = 1 + max(int(gpu) for group in prefill for gpu in group.split(","))
        decode = split_gpus("decode", args.decode_gpus, args.decode, args.tp, after, count)
        shared = set(",".join(prefill).split(",")) & set(",".join(decode).split(","))
        if shared:
            raise PlacementError(
                f"GPU(s) {','.join(sorted(shared))} would serve both prefill and decode engines "
                "(--prefill-gpus and --decode-gpus must not overlap)"
            )
        return {
            "prefill": [{"gpus": gpus} for gpus in prefill],
            "decode": [{"gpus": gpus} for gpus in decode],
        }
    if args.prefill_gpus or args.decode_gpus or args.tp:
        say("--prefill-gpus, --decode-gpus and --tp have no effect on the CPU")
    cores = sorted(os.sched_getaffinity(0))
    prefill, decode = split_cores(cores, args.prefill, args.decode)
    engines = args.prefill + args.decode
    if len(cores) < engines:
        say(
            f"{engines} engines on {len(cores)} CPU core(s): engines of a role share its cores "
            f"(prefill on {', '.join(sorted(set(prefill)))}; decode on "
            f"{', '.join(sorted(set(decode)))})",
        )
    return {
        "prefill": [{"cpu_cores": group} for group in prefill],
        "decode": [{"cpu_cores": group} for group in decode],
    }
