"""The ready banner: where the system answers, what runs where, and a curl command to paste."""

from __future__ import annotations

import json
import shlex

from splitwise_local.samples import SAMPLES, chat_request
from splitwise_local.serve.prometheus import DASHBOARD
from splitwise_local.serve.system import System


def banner(system: System) -> str:
    """The ready message: the URL, one line per engine, and a curl command to paste."""
    body = json.dumps(chat_request(system.served_model, SAMPLES[0]))
    api_key = system.proxy.api_key
    auth = f"-H {shlex.quote('Authorization: Bearer ' + api_key)} " if api_key else ""
    return (
        f"ready: {system.proxy_url} (OpenAI-compatible; logs in {system.run_dir}; "
        "Ctrl-C stops everything)\n"
        + "".join(f"  {line}\n" for line in engine_lines(system))
        + (f"  {system.dtype_line}\n" if system.dtype_line else "")
        + prometheus_line(system)
        + f"  curl {system.proxy_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}-d {shlex.quote(body)}"
    )


def engine_lines(system: System) -> list[str]:
    """One line per engine: its name, URL and where it runs."""
    lines = []
    for engine in system.engines:
        spec = engine.plan.spec
        where = f"GPUs {spec.gpus}" if spec.gpus is not None else f"CPU cores {spec.cpu_cores}"
        lines.append(
            f"{engine.plan.name}: {engine.url} ({where}, log {engine.child.log_path.name})"
        )
    return lines


def prometheus_line(system: System) -> str:
    """Where Prometheus answers, and the dashboard to import, when it runs."""
    if system.prometheus_url is None:
        return ""
    return f"  prometheus: {system.prometheus_url} (Grafana dashboard: {DASHBOARD})\n"
