"""The identity checks' own rules, without an engine: how many comparisons a module may leave
out before it fails."""

import pytest

from tests.engine.checks import Judged


def record(judged: Judged, stable: int, unstable: int) -> None:
    for i in range(stable):
        judged.record(f"stable {i}", True)
    with pytest.warns(UserWarning, match="not judged"):
        for i in range(unstable):
            judged.record(f"unstable {i}", False)


def test_all_but_the_allowed_number_judged_passes_one_more_left_out_fails():
    judged = Judged(allowed_out=1)
    record(judged, stable=3, unstable=1)
    judged.check()
    record(judged, stable=0, unstable=1)
    with pytest.raises(AssertionError, match=r"3 of 5 .* minimum of 4.*'unstable 0'"):
        judged.check()


def test_nothing_judged_fails_even_within_the_allowance():
    judged = Judged(allowed_out=2)
    record(judged, stable=0, unstable=1)
    with pytest.raises(AssertionError, match="0 of 1"):
        judged.check()


def test_a_module_that_compared_nothing_has_nothing_to_check():
    Judged(allowed_out=0).check()
