"""Least-loaded picking with round-robin ties, and mark-down with back-off, on a fake clock."""

from __future__ import annotations

from splitwise_local.proxy.pool import EnginePool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool(n: int = 3) -> tuple[EnginePool, Clock]:
    clock = Clock()
    urls = [f"http://127.0.0.1:{8000 + i}" for i in range(n)]
    return EnginePool("decode", urls, backoff_initial_s=1.0, backoff_max_s=5.0, clock=clock), clock


def test_ties_go_round_robin():
    pool, _ = make_pool()
    picks = []
    for _ in range(6):
        endpoint = pool.acquire()
        picks.append(endpoint.url[-1])
        pool.release(endpoint)
    assert picks == ["0", "1", "2", "0", "1", "2"]


def test_fewest_in_flight_wins():
    pool, _ = make_pool()
    first, second = pool.acquire(), pool.acquire()
    third = pool.acquire()
    assert len({first.url, second.url, third.url}) == 3
    pool.release(second)
    assert pool.acquire() is second
    assert [e.in_flight for e in pool.endpoints] == [1, 1, 1]
    assert [e.requests for e in pool.endpoints] == [1, 2, 1]


def test_at_equal_in_flight_fewer_pending_prompt_tokens_win():
    pool, _ = make_pool(2)
    heavy, light = pool.acquire(tokens=900), pool.acquire(tokens=10)
    pool.release(heavy)
    pool.release(light)
    # Round robin alone would pick `heavy` (picked longest ago); its prompt is still pending.
    assert pool.acquire() is light
    pool.computed(heavy, 900)
    assert pool.acquire() is heavy


def test_exclude_and_none_left():
    pool, _ = make_pool(2)
    a = pool.acquire()
    b = pool.acquire(exclude=[a])
    assert b is not a
    assert pool.acquire(exclude=[a, b]) is None


def test_mark_down_backs_off_doubling_to_the_cap_and_recovers():
    pool, clock = make_pool(1)
    [endpoint] = pool.endpoints
    periods = []
    for _ in range(5):
        pool.mark_down(endpoint, "refused")
        assert pool.acquire() is None and not pool.is_up(endpoint)
        periods.append(endpoint.down_until - clock.now)
        clock.now = endpoint.down_until
    assert periods == [1.0, 2.0, 4.0, 5.0, 5.0]
    picked = pool.acquire()
    assert picked is endpoint, "after the back-off the endpoint is tried again"
    pool.mark_up(endpoint)
    pool.mark_down(endpoint, "refused again")
    assert endpoint.down_until - clock.now == 1.0, "a success resets the back-off"
    assert endpoint.failures == 6 and endpoint.last_error == "refused again"


def test_down_endpoint_is_skipped_while_others_serve():
    pool, clock = make_pool(2)
    down = pool.endpoints[0]
    pool.mark_down(down, "timeout")
    for _ in range(3):
        endpoint = pool.acquire()
        assert endpoint is pool.endpoints[1]
        pool.release(endpoint)
    clock.now += 1.0
    assert {pool.acquire().url, pool.acquire().url} == {e.url for e in pool.endpoints}
