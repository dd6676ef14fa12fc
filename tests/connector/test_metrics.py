"""The connector's counters: summed across workers and the scheduler, registered once per
stat logger (vLLM re-creates those), exposed as `splitwise:<name>_total`."""

from types import SimpleNamespace

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from splitwise_local.connector.metrics import Counters, SplitwisePromMetrics


def test_counters_sum_per_interval_and_aggregate_across_workers():
    worker, scheduler = Counters(), Counters()
    assert worker.take() is None  # nothing happened: vLLM sends nothing
    worker.add(loads=1, loaded_tokens=999, loaded_bytes=23e6)
    worker.add(loaded_tokens=1)
    scheduler.add(store_unavailable=1)
    total = worker.take().aggregate(scheduler.take())
    assert total.reduce() == {"loads": 1, "loaded_tokens": 1000, "loaded_bytes": 23e6,
                              "store_unavailable": 1}  # fmt: skip
    assert worker.take() is None  # taken: the next interval starts from zero


def test_prometheus_counters_per_engine_survive_a_second_registration():
    types = {Counter: Counter, Gauge: Gauge, Histogram: Histogram}
    config = SimpleNamespace(kv_transfer_config=None)
    for _ in range(2):
        metrics = SplitwisePromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    metrics.observe({"loaded_tokens": 5.0, "save_failures": 2.0}, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert REGISTRY.get_sample_value("splitwise:loaded_tokens_total", labels) == 5.0
    assert REGISTRY.get_sample_value("splitwise:save_failures_total", labels) == 2.0
    assert REGISTRY.get_sample_value("splitwise:saved_tokens_total", labels) == 0.0
