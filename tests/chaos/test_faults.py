"""Faults under load on real engines: each component killed (or frozen) in turn while eight
streaming requests run, and the system heals without a human.

One load runs through the whole module (`bench chaos`'s closed-loop callers); the faults are
applied one after another to the shared system, in the order below, each waited out until the
component is back. Per fault: requests sent once the system had noticed never fail; those that
reached the dead component may fail, but only with an OpenAI-format error (an error answer, or
an error event then `[DONE]`); a prefill engine's or the store's death fails no request at all;
the component comes back (one restart) and leaves no process behind; a restarted store is empty,
no engine was restarted for it, and the decode engine's external hits resume. Last, no request
of the whole run hung.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from splitwise_bench.chaos import CI_FAULTS, FAULTS, Load, freeze_time, run_fault
from tests.chaos.conftest import HEALTH_DEADLINE_S

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
CALLERS = 8
MAX_TOKENS = 48
REQUEST_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def load(system) -> Iterator[Load]:
    running = Load(system.url, system.model, CALLERS, MAX_TOKENS, REQUEST_TIMEOUT_S).start()
    yield running
    running.stop()


@pytest.mark.parametrize("name", CI_FAULTS)
def test_fault_heals_and_fails_only_what_it_hit(system, load, name):
    fault = FAULTS[name]
    result = run_fault(system, load, fault, freeze_time(HEALTH_DEADLINE_S), RECOVERY_TIMEOUT_S)
    print(result.as_dict())
    assert result.back_s is not None, f"{fault.component} did not come back"
    assert result.restarts == 1
    assert result.in_flight >= CALLERS  # the fault hit a loaded system
    assert result.unclean == 0, result.errors
    assert result.sent_after > 0
    assert result.failed_after == 0, result.errors
    assert result.first_success_s is not None
    assert result.orphans == 0
    if fault.component != "decode engine":  # prefill: decode computes; store: engines do
        assert result.failed_in_flight == 0, result.errors
    if fault.component == "store":
        # The engines rode the store's death out: neither was restarted.
        assert result.others_restarted == {"prefill engine": 0, "decode engine": 0}
        assert result.store_empty_after_restart is True
        assert result.hits_resumed is True


def test_no_request_hung_or_ended_uncleanly(load):
    """Last: every call of the whole run ended, each failure with an OpenAI-format error."""
    load.stop()
    summary = load.summary()
    assert summary["unended"] == 0
    assert summary["unclean"] == 0
    assert summary["ok"] > summary["failed"]
