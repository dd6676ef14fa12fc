"""One real system, started as a user starts it, shared by the chaos suite's modules.

The modules run in file order on the same launch: bad input first (every engine must still be
up after it), then the exposure check, then the faults (each component killed or frozen and
restarted), then the soak's short mode on the healed system. The partition test starts its
own system (its store lives in a network namespace).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from splitwise_testing.launch import Running, launch_system, leftovers, sweep

HEALTH_DEADLINE_S = 10.0  # the launcher's --health-deadline: short, so a freeze test is short


@pytest.fixture(scope="package")
def system(tmp_path_factory) -> Iterator[Running]:
    run_dir = tmp_path_factory.mktemp("chaos") / "run"
    running = launch_system(run_dir, HEALTH_DEADLINE_S)
    try:
        yield running
        running.launch.stop()
        assert leftovers(run_dir) == [], "processes of the run outlived its stop"
    finally:
        running.launch.stop()
        sweep(run_dir)
