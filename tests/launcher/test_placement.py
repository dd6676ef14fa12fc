"""Engine placement (serve/placement.py): CPU cores and GPUs split between the roles' engines."""

from __future__ import annotations

import re

import pytest

from splitwise_local.serve.placement import PlacementError, split_cores, split_gpus


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


def test_gpu_lists_are_split_evenly_between_a_roles_engines():
    assert split_gpus("decode", "0,1", 1, None, 0, 2) == ["0,1"]
    assert split_gpus("prefill", "0,1,2,3", 2, None, 0, 4) == ["0,1", "2,3"]
    assert split_gpus("prefill", None, 1, None, 0, 2) == ["0"]
    assert split_gpus("decode", None, 1, None, 1, 2) == ["1"]
    assert split_gpus("decode", None, 2, 2, 2, 6) == ["2,3", "4,5"]
    with pytest.raises(PlacementError, match="--decode-gpus 'a': expected GPU numbers"):
        split_gpus("decode", "a", 1, None, 0, 2)
    with pytest.raises(PlacementError, match="--prefill-gpus 2: this machine has 2 GPU"):
        split_gpus("prefill", "2", 1, None, 0, 2)
    with pytest.raises(
        PlacementError, match=re.escape("3 GPU(s) do not split evenly between 2 prefill")
    ):
        split_gpus("prefill", "0,1,2", 2, None, 0, 4)
    with pytest.raises(PlacementError, match=re.escape("with --tp 2 need 4 GPU(s), not 2")):
        split_gpus("decode", "0,1", 2, 2, 0, 4)
