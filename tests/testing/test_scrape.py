"""scrape.py reads a page that prometheus_client itself renders: exact sample names (no
`_created`, no prefix matches), labels as parsed, a missing gauge told apart from a zero one."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from splitwise_testing.scrape import read_page, samples, total, value
from tests.proxy.servers import Servers


@pytest.fixture(scope="module")
def page() -> Iterator[str]:
    registry = CollectorRegistry()
    hits = Counter("hits", "", ["engine", "role"], registry=registry)
    hits.labels("http://a", "decode").inc(3)
    hits.labels("http://b", "decode").inc(4)
    hits.labels("http://a", "prefill").inc(5)
    Gauge("hits_total_dropped", "", registry=registry).set(100)  # its name starts alike
    up = Gauge("up", "", ["engine"], registry=registry)
    up.labels("http://a").set(0)
    quoted = Gauge("quoted", "", ["text"], registry=registry)
    quoted.labels('say "hi", then } leave').set(7)

    async def metrics(_):
        return Response(generate_latest(registry), media_type="text/plain")

    servers = Servers()
    try:
        yield servers.serve(Starlette(routes=[Route("/metrics", metrics)]))
    finally:
        servers.stop()


def test_samples_are_matched_by_exact_name_with_labels_parsed(page):
    found = sorted(samples(page, "hits_total"), key=lambda s: s[1])
    assert [v for _, v in found] == [3, 4, 5]
    assert found[0][0] == {"engine": "http://a", "role": "decode"}
    assert total(page, "hits_total") == 12  # neither hits_created nor hits_total_dropped
    assert total(page, "hits_total", role="decode") == 7
    assert total(page, "hits_total", engine="http://a", role="prefill") == 5
    assert total(page, "hits_total", role="nobody") == 0
    assert value(page, "quoted", text='say "hi", then } leave') == 7


def test_value_tells_a_zero_from_a_missing_sample(page):
    assert value(page, "up", engine="http://a") == 0
    assert value(page, "up", engine="http://b") is None
    with pytest.raises(ValueError, match="2 samples"):
        value(page, "hits_total", role="decode")


def test_a_page_that_is_not_there_is_an_error(page):
    with pytest.raises(httpx.HTTPStatusError):
        samples(page + "/nothing", "up")


def test_one_page_read_once_answers_several_questions(page):
    once = read_page(page)
    assert total(once, "hits_total", role="decode") == total(page, "hits_total", role="decode")
    assert value(once, "up", engine="http://a") == 0
    assert samples(once, "hits_total") == samples(page, "hits_total")
