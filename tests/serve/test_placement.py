"""Engine placement (serve/placement.py): CPU cores and GPUs split between the roles' engines.

The GPU cases run on the CPU: `gpu_placement` takes the GPU count that `placement` reads from
torch on a GPU machine."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from splitwise_local.serve.options import add_arguments, settings_from_args
from splitwise_local.serve.placement import PlacementError, gpu_placement, placement, split_cores
from splitwise_local.serve.settings import LaunchSettings


def test_every_engine_gets_its_own_cores_when_there_are_enough():
    assert split_cores([0, 1], 1, 1) == (["0"], ["1"])
    assert split_cores([4, 5, 6, 7, 8], 1, 1) == (["4,5"], ["6,7,8"])
    assert split_cores(list(range(8)), 1, 2) == (["0,1"], ["2,3,4", "5,6,7"])
    assert split_cores(list(range(4)), 2, 2) == (["0", "1"], ["2", "3"])


def test_with_fewer_cores_than_engines_a_role_shares_its_own_cores():
    # Two cores: prefill keeps one, decode the other, however many engines each role has.
    assert split_cores([0, 1], 1, 2) == (["0"], ["1", "1"])
    assert split_cores([0, 1], 2, 1) == (["0", "0"], ["1"])
    assert split_cores([0, 1, 2], 1, 3) == (["0"], ["1", "2", "1"])
    assert split_cores([3], 1, 1) == (["3"], ["3"])
    assert split_cores([3], 2, 1) == (["3", "3"], ["3"])


def launcher_args(*argv: str) -> LaunchSettings:
    """The launcher's settings as its own parser reads them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def gpus(settings: LaunchSettings, count: int, visible: str | None = None) -> tuple[list, list]:
    where = gpu_placement(settings, count, visible)
    return [e.gpus for e in where["prefill"]], [e.gpus for e in where["decode"]]


def test_by_default_prefill_takes_the_first_gpus_and_decode_the_next():
    assert gpus(launcher_args(), 2) == (["0"], ["1"])
    assert gpus(launcher_args(), 8) == (["0"], ["1"])
    assert gpus(launcher_args("--prefill", "1", "--decode", "2"), 3) == (["0"], ["1", "2"])
    assert gpus(launcher_args("--prefill", "2", "--decode", "2", "--tp", "2"), 8) == (
        ["0,1", "2,3"],
        ["4,5", "6,7"],
    )


def test_named_gpus_split_evenly_and_the_other_role_takes_what_is_left():
    args = launcher_args("--prefill", "2", "--prefill-gpus", "0,1,2,3", "--decode-gpus", "4,5")
    assert gpus(args, 6) == (["0,1", "2,3"], ["4,5"])
    assert gpus(launcher_args("--prefill-gpus", "2"), 4) == (["2"], ["0"])
    assert gpus(launcher_args("--decode-gpus", "0"), 4) == (["1"], ["0"])
    assert gpus(launcher_args("--decode-gpus", "0,1", "--tp", "2"), 4) == (["2,3"], ["0,1"])


def test_overlapping_gpus_are_refused():
    args = launcher_args("--prefill-gpus", "0,1", "--decode-gpus", "1,2", "--tp", "2")
    with pytest.raises(PlacementError, match=re.escape("GPU(s) 1 would serve both prefill and")):
        gpu_placement(args, 4)
    with pytest.raises(PlacementError, match="--prefill-gpus 0,0: names a GPU twice"):
        gpu_placement(launcher_args("--prefill", "2", "--prefill-gpus", "0,0"), 4)


def test_too_few_gpus_are_refused_with_what_was_needed():
    with pytest.raises(
        PlacementError,
        match=re.escape(
            "2 GPU(s) needed (1 prefill engine(s) x 1 + 1 decode engine(s) x 1), "
            "and this machine has 1"
        ),
    ):
        gpu_placement(launcher_args(), 1)
    with pytest.raises(PlacementError, match=re.escape("6 GPU(s) needed (1 prefill engine(s) x 2")):
        gpu_placement(launcher_args("--decode", "2", "--tp", "2"), 5)
    with pytest.raises(
        PlacementError,
        match=re.escape("4 GPU(s) needed (--prefill-gpus 0,1 + 1 decode engine(s) x 2)"),
    ):
        gpu_placement(launcher_args("--prefill-gpus", "0,1", "--tp", "2"), 2)
    with pytest.raises(PlacementError, match="--decode-gpus 3: this machine has 2 GPU"):
        gpu_placement(launcher_args("--decode-gpus", "3"), 2)
    with pytest.raises(PlacementError, match="--device cuda, but CUDA sees no GPU here"):
        gpu_placement(launcher_args(), 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA sees no GPU")
def test_placement_on_cuda_counts_the_gpus_torch_sees():
    args = launcher_args("--device", "cuda")
    with pytest.raises(PlacementError, match="CUDA sees no GPU here"):
        placement(args, "cuda", lambda line: None)


def test_prefill_and_decode_engines_need_the_same_tensor_parallel_size():
    # Their KV is keyed by tensor-parallel size: decode would never find prefill's chunks.
    args = launcher_args("--prefill-gpus", "0,1", "--decode-gpus", "2")
    with pytest.raises(
        PlacementError, match=re.escape("prefill engines would run on 2 GPU(s) each and")
    ):
        gpu_placement(args, 4)
    without_kv = launcher_args("--prefill-gpus", "0,1", "--decode-gpus", "2", "--connector", "none")
    assert gpus(without_kv, 4) == (["0,1"], ["2"])
    with pytest.raises(PlacementError, match=re.escape("with --tp 2 need 4 GPU(s), not 2")):
        gpu_placement(launcher_args("--prefill", "2", "--prefill-gpus", "0,1", "--tp", "2"), 4)
    with pytest.raises(PlacementError, match=re.escape("3 GPU(s) do not split evenly between 2")):
        gpu_placement(launcher_args("--decode", "2", "--decode-gpus", "1,2,3"), 4)


def test_gpus_are_named_as_the_launchers_own_cuda_visible_devices_names_them():
    # CUDA numbers the visible GPUs from 0; an engine's CUDA_VISIBLE_DEVICES names real ones.
    assert gpus(launcher_args(), 2, "2,3") == (["2"], ["3"])
    assert gpus(launcher_args("--tp", "2"), 4, "4,5,6,7") == (["4,5"], ["6,7"])
    uuids = "GPU-5a1c3f5e-0b8e,GPU-7e2d4a6b-1c9f"
    assert gpus(launcher_args("--prefill-gpus", "1"), 2, uuids) == (
        ["GPU-7e2d4a6b-1c9f"],
        ["GPU-5a1c3f5e-0b8e"],
    )
