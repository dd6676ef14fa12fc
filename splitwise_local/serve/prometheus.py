"""A real Prometheus for one run (`serve --prometheus`): Debian's `prometheus`, bound to
127.0.0.1, scraping the proxy, every engine and the store.

The scrape config is generated from the launch plan and written into the run folder
(`prometheus.yml`, checked by Prometheus's own `promtool` in the tests), with the time series
beside it (`prometheus/`), so a run's numbers stay with its logs. Each engine target is
labelled with its role and name (`role`, `component`; vLLM's own `engine` label stays as it
is), which is what the dashboard (configs/grafana/splitwise.json) groups by. Prometheus itself
is one more supervised child: started first, stopped last, so it sees the whole run.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from splitwise_local.serve.console import Console
from splitwise_local.serve.process import Child

BINARY = "prometheus"  # Debian's package puts it on PATH
INSTALL_HINT = "bash scripts/setup.sh --with-prometheus"
DEFAULT_PORT = 9099  # not 9090: Debian's own prometheus service, where it runs, has that one
DEFAULT_INTERVAL_S = 5.0
DASHBOARD = "configs/grafana/splitwise.json"  # Grafana: Dashboards > New > Import


class PrometheusMissing(RuntimeError):
    """Debian's prometheus is not installed; the message says how to install it."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One `/metrics` page: its job (proxy, engine, store), host:port and extra labels."""

    job: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)


def scrape_config(targets: Sequence[ScrapeTarget], interval_s: float) -> dict[str, Any]:
    """Prometheus's configuration: one job per kind of component, one static target each."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        entry: dict[str, Any] = {"targets": [target.address]}
        if target.labels:
            entry["labels"] = dict(target.labels)
        jobs.setdefault(target.job, []).append(entry)
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": entries}
            for job, entries in jobs.items()
        ],
    }


def binary() -> str:
    """The `prometheus` binary on PATH, else PrometheusMissing with the install hint."""
    found = shutil.which(BINARY)
    if found is None:
        raise PrometheusMissing(
            f"`{BINARY}` is not installed (Debian's prometheus package): run `{INSTALL_HINT}`"
        )
    return found


def prometheus_child(
    targets: Sequence[ScrapeTarget],
    port: int,
    interval_s: float,
    run_dir: Path,
    env: dict[str, str],
    console: Console,
) -> Child:
    """The Prometheus child of a run, its config written to `run_dir/prometheus.yml`."""
    config = run_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets, interval_s), sort_keys=False))
    command = [
        binary(),
        f"--config.file={config}",
        f"--storage.tsdb.path={run_dir / 'prometheus'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=7d",
    ]
    return Child("prometheus", command, env, run_dir / "prometheus.log", console)


def ready_url(port: int) -> str:
    """Prometheus's readiness endpoint: 200 once it serves queries."""
    return f"http://127.0.0.1:{port}/-/ready"
