"""Real vLLM engines with our store, for benchmarks and end-to-end tests: start, ask, stop.

A `System` is our store plus a prefill engine (kv_producer) and a decode engine (kv_consumer)
with a given config; the reference is a plain engine with no connector. Every engine runs on
one core and, unless `engine_args` turns it back on, with prefix caching off, so a second request
for the same prompt is computed (or loaded) again rather than served from the engine's own
cache, and numerics match between them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import psutil

from splitwise_local.config import SplitwiseConfig, dump_config
from splitwise_local.serve.console import Console
from splitwise_local.serve.engine import EngineSpec
from splitwise_local.serve.mooncake_master import MasterSpec, supervised_master
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.probes import http_ok
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.supervisor import Readiness, Supervisor
from splitwise_local.store.backend import KVBackend, open_backend
from splitwise_testing.scrape import read_page, total

ENGINE_START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 300
METRICS_TIMEOUT_S = 60
NEW_TOKENS = 64
PROSE = Path(str(resources.files("splitwise_local.data").joinpath("prose.txt")))


def _json(reply: httpx.Response) -> dict:
    if reply.is_error:
        raise RuntimeError(f"{reply.request.url} answered {reply.status_code}: {reply.text[:500]}")
    return reply.json()


@dataclass
class Engine:
    """One running engine: its URL, its log, and the model name it serves."""

    url: str
    child: Child
    model: str
    _log_offset: int = 0

    def complete(self, prompt, max_tokens: int = NEW_TOKENS, **extra) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            **extra,
        }
        return _json(httpx.post(f"{self.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S))

    def time_to_first_token(self, prompt: list[int], **extra) -> float:
        """Seconds from sending a streamed completion to its first token arriving."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                "ignore_eos": True, "stream": True, **extra}  # fmt: skip
        started = time.perf_counter()
        with httpx.stream(
            "POST", f"{self.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S
        ) as reply:
            reply.raise_for_status()
            first = None
            for line in reply.iter_lines():  # read to the end so the request completes
                if first is None and line.startswith("data: ") and '"text"' in line:
                    first = time.perf_counter() - started
        if first is None:
            raise RuntimeError("the stream ended without a token")
        return first

    def chat(self, text: str, max_tokens: int = NEW_TOKENS) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        url = f"{self.url}/v1/chat/completions"
        return _json(httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S))

    def new_log(self) -> str:
        """Log lines written since the previous call (the connector logs one line per request)."""
        data = self.child.log_path.read_bytes()[self._log_offset :]
        self._log_offset += len(data)
        return data.decode(errors="replace")

    def wait_log(self, until: str, timeout: float = 15.0) -> str:
        """New log text, read until a line matching `until` is in it (or `timeout` passed).

        The log reaches its file through a pipe and a copying thread, so a line the engine wrote
        before answering may land a moment after the answer.
        """
        regex, text = re.compile(until), ""
        deadline = time.monotonic() + timeout
        while True:
            text += self.new_log()
            if regex.search(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.2)

    def expect_log(self, pattern: str, timeout: float = 15.0) -> list[tuple[str, ...]]:
        """The groups of every new log line matching `pattern`, waiting for the first one."""
        text = self.wait_log(pattern, timeout)
        return [m.groups() or (m.group(0),) for m in re.finditer(pattern, text)]

    def worker(self):
        """The engine's model-runner process (`VLLM::Worker`), where the connector moves KV."""
        for process in self.child.family():
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.name().startswith("VLLM::Worker"):
                    return process
        raise RuntimeError(f"{self.url}: no VLLM::Worker process under the engine")

    def metrics(self, *names: str) -> list[float]:
        """The sums of the engine's samples named `names` (all labels), from one read of its
        /metrics page. The wait is long (`METRICS_TIMEOUT_S`): an engine whose core another
        engine's busy work shares (NIXL pins both engines' workers to one core) was seen to
        take over 10 s to answer."""
        page = read_page(self.url, timeout=METRICS_TIMEOUT_S)
        return [total(page, name) for name in names]

    def metric(self, name: str) -> float:
        """The sum of the engine's samples named `name` (all labels)."""
        return self.metrics(name)[0]


@dataclass
class System:
    """Store + engines of one configuration, stopped by `stop()`."""

    supervisor: Supervisor
    config: SplitwiseConfig
    engines: dict[str, Engine] = field(default_factory=dict)
    store_child: Child | None = None
    # Run after the processes stop: what a setup made outside the run folder (a peer's files).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def backend(self) -> KVBackend:
        return open_backend(self.config.remote_url, self.config)

    def restart_store(self) -> None:
        """Starts a fresh (empty) store on the same port and shm name, as a supervisor would
        after the store died; the engines are left alone."""
        old = self.store_child
        assert old is not None and not old.running, "stop the store first"
        store = Child(old.name, old.command, old.env, old.log_path, self.supervisor.console)
        ready = Readiness(lambda: self.backend().stats(), "store stats")
        self.supervisor.start_stage([(store, ready)], 60)
        self.store_child = store

    def stop(self) -> None:
        """Stops the engines and the store; the cleanups run even if that failed."""
        try:
            self.supervisor.stop_all()
        finally:
            for cleanup in self.cleanups:
                cleanup()


def start_system(
    root: Path,
    model: Path,
    config: SplitwiseConfig | None,
    roles: dict[str, str],
    connector_extra: dict | None = None,
    transport: str = "shm",
    engine_args: dict[str, list[str]] | None = None,
    engine_env: dict[str, dict[str, str]] | None = None,
) -> System:
    """Starts the store (when `config` is given) and one engine per name in `roles`.

    The engines reach the store through its shared-memory arena (`transport="shm"`, what the
    launcher does on one host) or over TCP (`"tcp"`, what engines on other hosts do); with
    `"mooncake"` a loopback mooncake_master runs instead and the engines mount the memory; with
    `"remote"` no store is started: the engines use the one at `config.remote_url`.
    `engine_args` adds vLLM flags per engine name (`--enable-prefix-caching` turns the
    engine's own prefix cache back on); `engine_env` adds environment variables per engine name.
    """
    root.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(Console("error"), run=str(root), stop_grace=20)
    system = System(supervisor, config or SplitwiseConfig())
    env = child_env(root)
    try:
        config_file = _start_store(system, config, transport, root, env)
        members = []
        for index, (name, role) in enumerate(roles.items()):
            spec = EngineSpec(
                model=model,
                port=free_port(),
                role=role,
                config_file=config_file,
                cpu_cores=str(index % 2),
                extra_args=["--no-enable-prefix-caching", *(engine_args or {}).get(name, [])],
                connector_extra=connector_extra or {},
            )
            environment = spec.environment(env) | (engine_env or {}).get(name, {})
            child = Child(
                name, spec.command(), environment, root / f"{name}.log", supervisor.console
            )
            system.engines[name] = Engine(spec.url, child, str(model))
            members.append((child, Readiness(lambda u=spec.url: http_ok(f"{u}/health"), "/health")))
        supervisor.start_stage(members, ENGINE_START_TIMEOUT_S)
    except BaseException:
        supervisor.stop_all()
        raise
    return system


def _start_store(
    system: System, config: SplitwiseConfig | None, transport: str, root: Path, env: dict
) -> Path | None:
    """The store `transport` asks for (none without a config, or for "remote"), started under
    the system's supervisor; returns the config file the engines read, with the store's URL."""
    supervisor = system.supervisor
    if config is None:
        return None
    if transport == "remote":
        return dump_config(config, root / "splitwise.yaml")
    if transport == "mooncake":
        master = MasterSpec.on_free_ports()
        system.config = config.model_copy(update={"remote_url": master.url})
        config_file = dump_config(system.config, root / "splitwise.yaml")
        member = supervised_master(master, env, root / "master.log", supervisor.console)
        supervisor.start_stage([member], 60)
        system.store_child = member[0]
        return config_file
    port, shm = free_port(), f"splitwise-test-{uuid.uuid4().hex[:8]}"
    url = f"shm://{shm}" if transport == "shm" else f"lm://127.0.0.1:{port}"
    system.config = config.model_copy(update={"remote_url": url})
    config_file = dump_config(system.config, root / "splitwise.yaml")
    store = Child(
        "store",
        [sys.executable, "-m", "splitwise_local", "store", "--port", str(port),
         "--shm-name", shm, "--max-size-gb", str(config.max_local_cpu_size)],
        env, root / "store.log", supervisor.console,
    )  # fmt: skip
    ready = Readiness(lambda: system.backend().stats(), "store stats")
    supervisor.start_stage([(store, ready)], 60)
    system.store_child = store
    return config_file


def child_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SPLITWISE_LOG_LEVEL"] = "DEBUG"
    env[RUN_ENV] = str(root)
    return env
