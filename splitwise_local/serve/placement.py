"""Where each engine runs: its GPUs (CUDA_VISIBLE_DEVICES) or its CPU cores (vLLM's OpenMP
binding), decided before anything starts.

Prefill and decode engines never share a GPU, and on the CPU they get cores of their own even
when there are fewer cores than engines: prefill work must not slow decoding, which is the point
of disaggregating. A placement that cannot be (too few GPUs, GPUs that do not exist, overlap,
do not split evenly, or give prefill and decode different tensor-parallel sizes) is a
`PlacementError` with a one-line message for the user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from splitwise_local.serve.settings import LaunchSettings

GPU_LIST = re.compile(r"^\d+(,\d+)*$")


@dataclass(frozen=True)
class Placement:
    """One engine's share of the machine: its GPUs (CUDA_VISIBLE_DEVICES) or its CPU cores."""

    gpus: str | None = None
    cpu_cores: str | None = None

    @property
    def tp(self) -> int:
        """Its tensor-parallel size: one per GPU (1 on the CPU)."""
        return len(self.gpus.split(",")) if self.gpus else 1


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
    """The GPU numbers `option` names (`0,1`), each once and each one of this machine's `count`
    GPUs."""
    if not GPU_LIST.match(value):
        raise PlacementError(f"{option} {value!r}: expected GPU numbers like 0 or 0,1")
    gpus = [int(gpu) for gpu in value.split(",")]
    if any(gpu >= count for gpu in gpus):
        message = f"this machine has {count} GPU(s) (numbered from 0)"
        raise PlacementError(f"{option} {value}: {message}")
    if len(set(gpus)) < len(gpus):
        raise PlacementError(f"{option} {value}: names a GPU twice")
    return gpus


def split_gpus(role: str, gpus: list[int], engines: int, tp: int | None) -> list[list[int]]:
    """Each of a role's `engines` its share of `gpus`, evenly (exactly `tp` each if given)."""
    option, value = f"--{role}-gpus", ",".join(map(str, gpus))
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
    return [gpus[i * each : (i + 1) * each] for i in range(engines)]


def gpu_placement(
    settings: LaunchSettings, count: int, visible: str | None = None
) -> dict[str, list[Placement]]:
    """Per role, each engine's CUDA_VISIBLE_DEVICES on a machine whose CUDA sees `count` GPUs.

    A role without `--prefill-gpus`/`--decode-gpus` takes `engines * tp` of the GPUs the other
    role did not name, prefill first: by default N x K GPUs from 0 for prefill, the next M x K
    for decode. GPUs are numbered as CUDA numbers them in the launcher, so where the launcher
    itself runs under CUDA_VISIBLE_DEVICES (`visible`) an engine's numbers are mapped back to
    its entries: a child's CUDA_VISIBLE_DEVICES names the machine's GPUs, not its parent's.
    """
    if count == 0:
        raise PlacementError(
            "--device cuda, but CUDA sees no GPU here: serve on the CPU (--device cpu), or run "
            "scripts/setup.sh on a machine whose nvidia-smi lists a GPU (it installs CUDA torch)"
        )
    engines = {"prefill": settings.prefill, "decode": settings.decode}
    named = {
        role: gpu_list(f"--{role}-gpus", value, count)
        for role, value in (("prefill", settings.prefill_gpus), ("decode", settings.decode_gpus))
        if value is not None
    }
    if len(named) == 2 and (shared := sorted(set(named["prefill"]) & set(named["decode"]))):
        raise PlacementError(
            f"GPU(s) {','.join(map(str, shared))} would serve both prefill and decode engines "
            "(--prefill-gpus and --decode-gpus must not overlap)"
        )
    free = [gpu for gpu in range(count) if not any(gpu in gpus for gpus in named.values())]
    groups: dict[str, list[list[int]]] = {}
    for role, number in engines.items():
        gpus = named.get(role)
        if gpus is None:
            wanted = number * (settings.tp or 1)
            if wanted > len(free):
                raise PlacementError(too_few_gpus(settings, count, named))
            gpus, free = free[:wanted], free[wanted:]
        groups[role] = split_gpus(role, gpus, number, settings.tp)
    sizes = {role: len(parts[0]) for role, parts in groups.items()}
    if sizes["prefill"] != sizes["decode"] and settings.connector != "none":
        raise PlacementError(
            f"prefill engines would run on {sizes['prefill']} GPU(s) each and decode engines on "
            f"{sizes['decode']}: the KV they share is keyed by tensor-parallel size, so both "
            "roles need as many GPUs per engine (--tp)"
        )
    names = [name.strip() for name in visible.split(",")] if visible else None

    def devices(gpus: list[int]) -> str:
        return ",".join(names[gpu] if names else str(gpu) for gpu in gpus)

    return {
        role: [Placement(gpus=devices(gpus)) for gpus in parts] for role, parts in groups.items()
    }


def too_few_gpus(settings: LaunchSettings, count: int, named: dict[str, list[int]]) -> str:
    """The one line for engines that need more GPUs than the machine has."""
    each = settings.tp or 1
    need, parts = 0, []
    for role, engines in (("prefill", settings.prefill), ("decode", settings.decode)):
        if role in named:
            need += len(named[role])
            parts.append(f"--{role}-gpus {','.join(map(str, named[role]))}")
        else:
            need += engines * each
            parts.append(f"{engines} {role} engine(s) x {each}")
    return (
        f"{need} GPU(s) needed ({' + '.join(parts)}), and this machine has {count}: "
        "ask for fewer engines or a smaller --tp"
    )


def placement(
    settings: LaunchSettings, device: str, say: Callable[[str], None]
) -> dict[str, list[Placement]]:
    """Per role, each engine's GPUs (CUDA_VISIBLE_DEVICES) or CPU cores (OMP binding), for the
    launcher's `--prefill/--decode`, `--prefill-gpus/--decode-gpus` and `--tp`; `say` tells
    the user what on the CPU is ignored or shared."""
    if device == "cuda":
        import torch  # heavy: only a GPU launch needs it

        count = torch.cuda.device_count()
        return gpu_placement(settings, count, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if settings.prefill_gpus or settings.decode_gpus or settings.tp:
        say("--prefill-gpus, --decode-gpus and --tp have no effect on the CPU")
    cores = sorted(os.sched_getaffinity(0))
    prefill, decode = split_cores(cores, settings.prefill, settings.decode)
    engines = settings.prefill + settings.decode
    if len(cores) < engines:
        say(
            f"{engines} engines on {len(cores)} CPU core(s): engines of a role share its cores "
            f"(prefill on {', '.join(sorted(set(prefill)))}; decode on "
            f"{', '.join(sorted(set(decode)))})",
        )
    return {
        "prefill": [Placement(cpu_cores=group) for group in prefill],
        "decode": [Placement(cpu_cores=group) for group in decode],
    }
