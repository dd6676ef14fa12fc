"""`python -m splitwise_local [serve]`: the whole system on one host, in one command.

Start order: the KV store, then every engine together (`--prefill N --decode M`, one prefill and
one decode by default, each on its own GPUs or its own CPU cores), then the proxy, served in
this process. Everything that can be checked before a process starts is checked first (model
folder, config, free ports), so a mistake costs no startup time and leaves nothing behind. Each
child logs to a file in the run folder and, at the chosen level, to the console. Ctrl-C or
SIGTERM stops the proxy, then the engines, then the store. A child that dies or freezes while
serving is restarted (`--restart on-failure`, the default; the proxy routes around it
meanwhile) or stops everything with a non-zero exit (`--restart never`, or too many restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from splitwise_local.serve.console import LEVELS, Console, ConsoleHandler
from splitwise_local.serve.placement import Placement, PlacementError, placement
from splitwise_local.serve.process import RUN_ENV, Child, sweep_orphans
from splitwise_local.serve.prometheus import DEFAULT_INTERVAL_S as SCRAPE_INTERVAL_S
from splitwise_local.serve.prometheus import DEFAULT_PORT as PROMETHEUS_PORT
from splitwise_local.serve.supervisor import (
    LAUNCHER,
    POLL_S,
    RESTART_MODES,
    ChildEvent,
    Readiness,
    RestartPolicy,
    StartupError,
    StopRequested,
    Supervisor,
    Unhealthy,
)

if TYPE_CHECKING:
    from splitwise_local.config import SplitwiseConfig
    from splitwise_local.models.hub import Model
    from splitwise_local.serve.engine import EngineSpec

DEFAULT_STORE_PORT = 10080
PROXY_LOGGERS = ("uvicorn", "splitwise_local.proxy")


class LaunchError(RuntimeError):
    """A problem found before anything started; the message is one line for the user."""


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options (the default command)."""
    from splitwise_local.proxy.settings import DEFAULT_DISAGG_THRESHOLD_TOKENS

    parser.epilog = "Arguments after a bare `--` go to both vLLM engines unchanged."
    parser.add_argument(
        "--model",
        help="checkpoint folder, Hugging Face id or short name such as DeepSeek-V2-Lite "
        "(default: the embedded SmolLM2)",
    )
    parser.add_argument(
        "--config", help="splitwise YAML config (default: $SPLITWISE_CONFIG_FILE, built-ins)"
    )
    parser.add_argument("--port", type=int, default=8030, help="the proxy's port")
    parser.add_argument("--host", default="127.0.0.1", help="the proxy's address")
    parser.add_argument(
        "--prefill", type=positive, default=1, metavar="N", help="prefill engines (default 1)"
    )
    parser.add_argument(
        "--decode", type=positive, default=1, metavar="M", help="decode engines (default 1)"
    )
    parser.add_argument(
        "--prefill-port",
        type=int,
        default=8010,
        help="the first prefill engine's port; the others take the next ones",
    )
    parser.add_argument(
        "--decode-port",
        type=int,
        default=8020,
        help="the first decode engine's port; the others take the next ones",
    )
    parser.add_argument(
        "--store-port", type=int, help="the store's TCP port (default: the config's lm:// port)"
    )
    parser.add_argument(
        "--store-metrics-port",
        type=int,
        help="the store's Prometheus /metrics port (default: the store's port + 1)",
    )
    parser.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (Debian's), scraping the proxy, every engine and the store",
    )
    parser.add_argument(
        "--prometheus-port", type=int, default=PROMETHEUS_PORT, help="Prometheus's port"
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=SCRAPE_INTERVAL_S,
        metavar="SECONDS",
        help="how often Prometheus scrapes each component",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--prefill-gpus",
        help="GPUs of the prefill engines, split evenly between them (default: the first ones)",
    )
    parser.add_argument(
        "--decode-gpus",
        help="GPUs of the decode engines, split evenly between them (default: the next ones)",
    )
    parser.add_argument(
        "--tp", type=positive, metavar="K", help="GPUs per engine (tensor-parallel size)"
    )
    parser.add_argument(
        "--kv-cache-gb", type=int, default=1, help="on the CPU: each engine's KV cache space"
    )
    parser.add_argument(
        "--connector",
        choices=["splitwise", "lmcache", "none"],
        default="splitwise",
        help="KV transfer between the engines; lmcache: vLLM's LMCacheConnectorV1 on our store "
        "(CUDA only); none: plain engines, no store",
    )
    parser.add_argument(
        "--store",
        choices=["splitwise", "mooncake"],
        default="splitwise",
        help="the KV store: ours, or a local mooncake_master (Mooncake Store over TCP)",
    )
    parser.add_argument(
        "--disable-mla", action="store_true", help="set VLLM_MLA_DISABLE=1 (the seed's MLA setting)"
    )
    parser.add_argument(
        "--disagg",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: per request, through prefill only when the prompt's uncached part is long "
        "(or straight to decode while prefill is saturated); always: through prefill; "
        "never: decode engines alone",
    )
    parser.add_argument(
        "--disagg-threshold",
        type=int,
        default=DEFAULT_DISAGG_THRESHOLD_TOKENS,
        metavar="TOKENS",
        help="auto: prompts with fewer uncached tokens go straight to decode (%(default)s)",
    )
    parser.add_argument(
        "--route-detail",
        action="store_true",
        help="show callers each request's route (x-splitwise-route header) and engine addresses "
        "in errors and /health; off by default: it tells any caller whether another caller's "
        "prompt is stored",
    )
    parser.add_argument("--api-key", help="require this Bearer token from the proxy's callers")
    parser.add_argument("--run-dir", help="folder for logs and the per-run config (runs/<time>)")
    parser.add_argument(
        "--log-level",
        choices=list(LEVELS),
        default="warning",
        help="children's lines shown on the console (the log files keep all)",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0, metavar="SECONDS")
    parser.add_argument("--stop-grace", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument(
        "--restart",
        choices=RESTART_MODES,
        default="on-failure",
        help="a child that dies or freezes while serving: restart it with back-off "
        "(on-failure) or stop everything with exit 1 (never)",
    )
    parser.add_argument(
        "--health-deadline",
        type=float,
        default=RestartPolicy.health_deadline_s,
        metavar="SECONDS",
        help="a child whose health check fails this long is frozen, and restarted",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy.max_restarts,
        metavar="N",
        help="restarts of one child within 10 minutes before giving up (stop, exit 1)",
    )


@dataclass(frozen=True)
class EngineMember:
    """One engine of the plan: where it runs, how it is started and how its readiness shows."""

    role: str  # "prefill" or "decode"
    index: int
    name: str  # "decode engine", or "decode engine 1" when the role has several
    spec: EngineSpec
    child: Child
    readiness: Readiness

    @property
    def url(self) -> str:
        """The engine's base URL."""
        return self.spec.url


@dataclass
class Plan:
    """Everything decided before the first process starts."""

    run_dir: Path
    store: tuple[Child, Readiness] | None
    engines: list[EngineMember]
    served_model: str
    proxy_url: str
    proxy_socket: socket.socket
    prometheus: tuple[Child, Readiness] | None = None
    prometheus_url: str | None = None
    routing: dict[str, object] = field(default_factory=dict)  # ProxySettings' routing fields
    dtype_line: str | None = None  # the engines' dtype and why, for the ready banner

    def urls(self, role: str) -> list[str]:
        """The base URLs of the engines of `role`, in order."""
        return [engine.url for engine in self.engines if engine.role == role]


def pick_run_dir(requested: str | None) -> Path:
    """The run folder: the one asked for (made if need be), else a new `runs/<time>[-N]`."""
    if requested:
        run_dir = Path(requested)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ["", *(f"-{n}" for n in range(1, 100))]:
        run_dir = Path("runs") / (stamp + suffix)
        try:
            run_dir.mkdir(parents=True)
            return run_dir.resolve()
        except FileExistsError:
            continue
    raise LaunchError(f"cannot create a run folder under runs/{stamp}*")


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not bind (host, port) now (same options as uvicorn and vLLM), or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
    return None


MOONCAKE_MASTER_PORT = 50051  # mooncake_master's own default RPC port


def check_ports(wanted: dict[str, tuple[str, int, str]]) -> None:
    """`wanted`: component -> (host, port, option). Raises naming every clash or busy port."""
    problems = []
    owners: dict[int, str] = {}
    for component, (host, port, option) in wanted.items():
        if port in owners:
            problems.append(f"{component} and {owners[port]} both use port {port} ({option})")
        elif (problem := bind_problem(host, port)) is not None:
            problems.append(f"port {port} for the {component} {problem} (choose another: {option})")
        owners.setdefault(port, component)
    if problems:
        raise LaunchError("; ".join(problems))


def engine_name(role: str, index: int, count: int) -> str:
    """`decode engine` when the role has one engine (its log: decode.log), else `decode engine
    0`, `decode engine 1`, ... (decode-0.log, ...)."""
    return f"{role} engine" if count == 1 else f"{role} engine {index}"


def log_name(role: str, index: int, count: int) -> str:
    """The engine's log file in the run folder: `decode.log`, or `decode-1.log` when the role
    has several."""
    return f"{role}.log" if count == 1 else f"{role}-{index}.log"


def store_url(config_url: str, store_port: int | None) -> tuple[int, str]:
    """The store's TCP port and the shm:// URL the engines on this host use."""
    scheme, _, rest = config_url.partition("://")
    if scheme == "mooncakestore":
        raise LaunchError(
            "the launcher runs our own store; remote_url mooncakestore:// is for "
            "engines started with the `engine` subcommand"
        )
    port = store_port
    if port is None and scheme == "lm":
        port = int(rest.rsplit(":", 1)[1]) if ":" in rest else DEFAULT_STORE_PORT
    port = port if port is not None else DEFAULT_STORE_PORT
    shm_name = rest if scheme == "shm" else f"splitwise-{port}"  # the store's own default
    return port, f"shm://{shm_name}"


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in a vLLM argument list, if present."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """A readiness check: GET `url` answers 200."""
    import httpx

    return httpx.get(url, timeout=timeout).status_code == 200


def engine_healthy(url: str) -> bool:
    """vLLM's /health: 200 while serving; 503 once its engine core has died, which the
    supervisor takes as a death at once (the API server itself exits only seconds later)."""
    import httpx

    status = httpx.get(url, timeout=2.0).status_code
    if status == 503:
        raise Unhealthy(f"GET {url} answered 503: its engine core is gone")
    return status == 200


def store_responds(url: str, config: SplitwiseConfig) -> bool:
    """The store's readiness check: a client connects and `stats()` answers."""
    from splitwise_local.store.backend import open_backend

    backend = open_backend(url, config)
    try:
        backend.stats()
    finally:
        backend.close()
    return True


def child_env(base: dict[str, str], run_dir: Path) -> dict[str, str]:
    """A child's environment: the run's tag (leftovers are found by it) and unbuffered output,
    so its log lines arrive as they are written."""
    return {**base, RUN_ENV: str(run_dir), "PYTHONUNBUFFERED": "1"}


def announce(console: Console, args: argparse.Namespace, model: Model, device: str) -> None:
    """One line: what is served, and where."""
    where = "on GPUs" if device == "cuda" else "on the CPU"
    if device == "cpu" and args.device == "auto":
        where += " (no GPU found)"
    which = f"the embedded model {model.name}" if args.model is None else f"model {model.name}"
    console.say(LAUNCHER, f"serving {which} {where} ({model.folder})")


def engine_dtype(device: str, extra: list[str], console: Console) -> tuple[list[str], str | None]:
    """The engines' vLLM arguments with the dtype this CPU runs fastest (unless the caller's
    `--dtype` says otherwise), and a line saying which and why. GPUs keep vLLM's own choice."""
    from splitwise_local.hardware.dtype import ProbeFailed, cache_path, cpu_dtype
    from splitwise_local.serve.engine import merge_args

    if device != "cpu":
        return extra, None
    if (given := flag_value(extra, "--dtype")) is not None:
        return extra, f"dtype: {given} (given after --)"
    if not cache_path().exists():
        console.say(LAUNCHER, "measuring this CPU's fastest engine dtype (first run only)")
    try:
        choice = cpu_dtype()
    except ProbeFailed as exc:
        raise LaunchError(f"{exc}; pass `-- --dtype bfloat16` or `-- --dtype float32`") from None
    line = f"dtype: {choice.dtype} ({choice.reason}; `-- --dtype X` overrides)"
    return merge_args(["--dtype", choice.dtype], extra), line


@dataclass(frozen=True)
class EngineDefaults:
    """What every engine of a run shares; `engine_member` adds what is each engine's own."""

    model: Path
    device: str
    config_file: Path | None
    kv_cache_gb: int
    extra_args: list[str]
    kv_roles: dict[str, str]  # launcher role -> EngineSpec role (prefill, decode, both, plain)
    lmcache_url: str | None
    disable_mla: bool
    run_dir: Path


def engine_member(
    defaults: EngineDefaults,
    role: str,
    index: int,
    count: int,
    port: int,
    where: Placement,
    console: Console,
) -> EngineMember:
    """The one place an engine child is built: its vLLM command, environment, log, readiness."""
    from splitwise_local.serve.engine import EngineSpec, merge_args

    extra = defaults.extra_args
    if (gpus := where.get("gpus")) and (tp := len(gpus.split(","))) > 1:
        extra = merge_args(["--tensor-parallel-size", str(tp)], extra)
    spec = EngineSpec(
        model=defaults.model,
        port=port,
        role=defaults.kv_roles[role],  # type: ignore[arg-type]
        config_file=defaults.config_file,
        device=defaults.device,  # type: ignore[arg-type]
        kv_cache_gb=defaults.kv_cache_gb,
        extra_args=extra,
        connector="lmcache" if defaults.lmcache_url else "splitwise",
        store_url=defaults.lmcache_url,
        **where,
    )
    env = child_env(spec.environment(), defaults.run_dir)
    if defaults.disable_mla:
        env["VLLM_MLA_DISABLE"] = "1"
    name = engine_name(role, index, count)
    log_path = defaults.run_dir / log_name(role, index, count)
    child = Child(name, spec.command(), env, log_path, console)
    health = f"{spec.url}/health"
    readiness = Readiness(lambda: engine_healthy(health), f"GET {health}")
    return EngineMember(role, index, name, spec, child, readiness)


def store_member(
    config: SplitwiseConfig,
    port: int,
    metrics_port: int,
    shm_url: str,
    run_dir: Path,
    console: Console,
) -> tuple[tuple[Child, Readiness], Path]:
    """The store child (with its /metrics on `metrics_port`), and the per-run config that
    points the engines at its arena."""
    from splitwise_local.config import dump_config

    engines_config = config.model_copy(update={"remote_url": shm_url})
    config_file = dump_config(engines_config, run_dir / "splitwise.yaml")
    # The store reads its capacity and auth token from the same file: no secret in `ps`.
    command = [sys.executable, "-m", "splitwise_local", "store", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--shm-name", shm_url.removeprefix("shm://")]
    command += ["--metrics-port", str(metrics_port), "--config", str(config_file)]
    child = Child(
        "store", command, child_env(dict(os.environ), run_dir), run_dir / "store.log", console
    )
    ready = Readiness(lambda: store_responds(shm_url, engines_config), f"stats() on {shm_url}")
    return (child, ready), config_file


def listen(host: str, port: int) -> socket.socket:
    """The proxy's listening socket, bound now so no other process can take the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LaunchError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def make_plan(args: argparse.Namespace, console: Console) -> Plan:
    """Resolves and checks everything; raises LaunchError. Creates only the run folder and,
    last, the proxy's listening socket."""
    from splitwise_local.config import ConfigError, load_config
    from splitwise_local.hardware.device import detect_device
    from splitwise_local.models.checkpoint import ModelError, default_model_dir
    from splitwise_local.models.hub import resolve_model
    from splitwise_local.serve.engine import merge_args

    device = detect_device() if args.device == "auto" else args.device
    try:
        config = load_config(args.config)
        if args.model is None and not default_model_dir().is_dir():
            console.say(LAUNCHER, "preparing the embedded model (first run only, about 30 s)")
        model = resolve_model(args.model, lambda text: console.say(LAUNCHER, text))
    except (ConfigError, ModelError) as exc:
        raise LaunchError(str(exc)) from None
    announce(console, args, model, device)

    counts = {"prefill": args.prefill, "decode": args.decode}
    first_ports = {"prefill": args.prefill_port, "decode": args.decode_port}
    wanted = {"proxy": (args.host, args.port, "--port")}
    for role, count in counts.items():
        for index in range(count):
            option = f"--{role}-port" + (f"; engine {index} uses it + {index}" if index else "")
            wanted[engine_name(role, index, count)] = (
                "127.0.0.1", first_ports[role] + index, option
            )  # fmt: skip
    use_store = args.connector != "none"
    mooncake = use_store and args.store == "mooncake"
    store_metrics_port: int | None = None  # our store's /metrics (Mooncake has none here)
    if mooncake:
        if args.connector == "lmcache":
            raise LaunchError("--store mooncake works with --connector splitwise only")
        store_port = args.store_port or MOONCAKE_MASTER_PORT
        wanted["mooncake master"] = ("127.0.0.1", store_port, "--store-port")
    elif use_store:
        store_port, shm_url = store_url(config.remote_url, args.store_port)
        wanted["store"] = ("127.0.0.1", store_port, "--store-port")
        store_metrics_port = args.store_metrics_port or store_port + 1
        wanted["store's /metrics"] = ("127.0.0.1", store_metrics_port, "--store-metrics-port")
    if args.prometheus:
        wanted["prometheus"] = ("127.0.0.1", args.prometheus_port, "--prometheus-port")
    lmcache_url = None
    if args.connector == "lmcache":
        from splitwise_local.serve.lmcache_config import LMCacheConfigError, lmcache_settings

        if device == "cpu":
            raise LaunchError("--connector lmcache runs LMCache's GPU connector: it needs CUDA")
        lmcache_url = f"lm://127.0.0.1:{store_port}"  # LMCache speaks its own protocol there
        try:
            lmcache_settings(config, lmcache_url)
        except LMCacheConfigError as exc:
            raise LaunchError(str(exc)) from None
    if args.connector == "splitwise" and not config.store_auth_token:
        # A token for this launch: the store requires it, the engines' connectors seal their
        # chunks with it, and the proxy's lookups present it; all read it from the run's
        # config file, which only this user can read. (LMCache's protocol cannot carry one.)
        config = config.model_copy(update={"store_auth_token": secrets.token_urlsafe(32)})
    check_ports(wanted)
    try:
        where = placement(args, device, lambda line: console.say(LAUNCHER, line))
    except PlacementError as exc:
        raise LaunchError(str(exc)) from None

    run_dir = pick_run_dir(args.run_dir)
    store, config_file = None, None
    if mooncake:
        from splitwise_local.serve.mooncake_master import launcher_member

        env = child_env(dict(os.environ), run_dir)
        try:
            store, config_file = launcher_member(config, store_port, run_dir, env, console)
        except FileNotFoundError as exc:
            raise LaunchError(f"Mooncake is not installed ({exc}): run scripts/setup.sh") from None
    elif use_store:
        assert store_metrics_port is not None
        store, config_file = store_member(
            config, store_port, store_metrics_port, shm_url, run_dir, console
        )

    extra = merge_args(["--served-model-name", model.name], args.extra)
    extra, dtype_line = engine_dtype(device, extra, console)
    defaults = EngineDefaults(
        model=model.folder,
        device=device,
        config_file=config_file,
        kv_cache_gb=args.kv_cache_gb,
        extra_args=extra,
        kv_roles=kv_roles(use_store, args.disagg),
        lmcache_url=lmcache_url,
        disable_mla=args.disable_mla,
        run_dir=run_dir,
    )
    engines = [
        engine_member(defaults, role, index, count, first_ports[role] + index, spot, console)
        for role, count in counts.items()
        for index, spot in enumerate(where[role])
    ]

    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    proxy_url = f"http://{shown_host}:{args.port}"
    prometheus = None
    if args.prometheus:
        prometheus = prometheus_member(
            args, proxy_url, engines, store_metrics_port, run_dir, console
        )
    return Plan(
        run_dir=run_dir,
        store=store,
        engines=engines,
        served_model=flag_value(extra, "--served-model-name") or model.name,
        proxy_url=proxy_url,
        proxy_socket=listen(args.host, args.port),
        prometheus=prometheus,
        prometheus_url=f"http://127.0.0.1:{args.prometheus_port}" if prometheus else None,
        routing=routing_settings(args, model.folder, config_file, extra, engines),
        dtype_line=dtype_line,
    )


def prometheus_member(
    args: argparse.Namespace,
    proxy_url: str,
    engines: list[EngineMember],
    store_metrics_port: int | None,
    run_dir: Path,
    console: Console,
) -> tuple[Child, Readiness]:
    """Prometheus, scraping the proxy, every engine (labelled with its role) and the store."""
    from splitwise_local.serve.prometheus import (
        PrometheusMissing,
        ScrapeTarget,
        prometheus_child,
        ready_url,
    )

    targets = [ScrapeTarget("proxy", proxy_url.removeprefix("http://"))]
    targets += [
        ScrapeTarget(
            "engine",
            engine.url.removeprefix("http://"),
            {"role": engine.role, "component": engine.name},
        )
        for engine in engines
    ]
    if store_metrics_port is not None:
        targets.append(ScrapeTarget("store", f"127.0.0.1:{store_metrics_port}"))
    env = child_env(dict(os.environ), run_dir)
    try:
        child = prometheus_child(
            targets, args.prometheus_port, args.scrape_interval, run_dir, env, console
        )
    except PrometheusMissing as exc:
        raise LaunchError(str(exc)) from None
    ready = ready_url(args.prometheus_port)
    return child, Readiness(lambda: http_ok(ready), f"GET {ready}")


def kv_roles(use_store: bool, disagg: str) -> dict[str, str]:
    """Each launcher role's engine role. Decode engines also save (kv_both) whenever requests
    may reach them without a prefill: what they computed is then in the store for the next."""
    if not use_store:
        return {"prefill": "plain", "decode": "plain"}
    return {"prefill": "prefill", "decode": "decode" if disagg == "always" else "both"}


def routing_settings(
    args: argparse.Namespace,
    model: Path,
    config_file: Path | None,
    extra: list[str],
    engines: list[EngineMember],
) -> dict[str, object]:
    """What the proxy needs to route like the engines compute: the policy, the model's
    tokenizer and key identity (KV dtype, tensor-parallel size), and the store's config."""
    dtype = flag_value(extra, "--kv-cache-dtype") or "auto"
    if dtype == "auto":
        dtype = flag_value(extra, "--dtype") or "auto"  # on the CPU engine_dtype always sets it
    gpus = engines[0].spec.gpus
    return {
        "disagg": args.disagg,
        "disagg_threshold_tokens": args.disagg_threshold,
        "route_detail": args.route_detail,
        "model": str(model),
        "kv_config": str(config_file) if config_file and args.connector == "splitwise" else None,
        "kv_dtype": dtype,
        "tp_size": len(gpus.split(",")) if gpus else 1,
    }


def banner(plan: Plan, api_key: str | None) -> str:
    """The ready message: the URL and a curl command to paste."""
    from splitwise_local.samples import SAMPLES, chat_request

    body = json.dumps(chat_request(plan.served_model, SAMPLES[0]))
    auth = f"-H {shlex.quote('Authorization: Bearer ' + api_key)} " if api_key else ""
    return (
        f"ready: {plan.proxy_url} (OpenAI-compatible; logs in {plan.run_dir}; "
        "Ctrl-C stops everything)\n"
        + "".join(f"  {line}\n" for line in engine_lines(plan))
        + (f"  {plan.dtype_line}\n" if plan.dtype_line else "")
        + prometheus_line(plan)
        + f"  curl {plan.proxy_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}-d {shlex.quote(body)}"
    )


def prometheus_line(plan: Plan) -> str:
    """Where Prometheus answers, and the dashboard to import, when it runs."""
    if plan.prometheus_url is None:
        return ""
    from splitwise_local.serve.prometheus import DASHBOARD

    return f"  prometheus: {plan.prometheus_url} (Grafana dashboard: {DASHBOARD})\n"


def engine_lines(plan: Plan) -> list[str]:
    """One line per engine: its name, URL and where it runs."""
    lines = []
    for engine in plan.engines:
        spec = engine.spec
        where = f"GPUs {spec.gpus}" if spec.gpus is not None else f"CPU cores {spec.cpu_cores}"
        lines.append(f"{engine.name}: {engine.url} ({where}, log {engine.child.log_path.name})")
    return lines


def proxy_logging(console: Console, log_path: Path) -> list[logging.Handler]:
    """Sends the in-process proxy's log records to proxy.log and, at the chosen level, the
    console; returns the handlers so they can be removed again."""
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    console_handler = ConsoleHandler(console, "proxy")
    console_handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [file_handler, console_handler]
    for name in PROXY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)
    return handlers


def serve_proxy(plan: Plan, supervisor: Supervisor, api_key: str | None) -> bool:
    """Serves the proxy until a stop signal (re-raised as StopRequested) or until the
    supervisor gives up on a child; returns True in that case. The proxy hears of every
    engine's death and return from the supervisor, and its /metrics shows the restarts."""
    import uvicorn

    from splitwise_local.proxy.app import build_app
    from splitwise_local.proxy.settings import ProxySettings

    settings = ProxySettings(
        prefill=plan.urls("prefill"), decode=plan.urls("decode"), api_key=api_key, **plan.routing
    )
    app = build_app(settings)
    proxy = app.state.proxy
    proxy.metrics.registry.register(supervisor.collector())
    engine_urls = {engine.child: engine.url for engine in plan.engines}

    def tell_proxy(event: ChildEvent) -> None:
        if (url := engine_urls.get(event.child)) is not None:
            proxy.engine_state(url, event.up, event.cause)

    supervisor.listen(tell_proxy)
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    handlers = proxy_logging(supervisor.console, plan.run_dir / "proxy.log")
    died = False

    async def watch() -> None:
        nonlocal died
        announced = False
        while not server.should_exit:
            if server.started and not announced:
                supervisor.say(banner(plan, api_key))
                announced = True
            if supervisor.failed.is_set():
                supervisor.console.error(LAUNCHER, supervisor.failure or "a child failed")
                died = True
                server.should_exit = True
            await asyncio.sleep(POLL_S)

    async def serve() -> None:
        watcher = asyncio.create_task(watch())
        try:
            await server.serve(sockets=[plan.proxy_socket])
        finally:
            watcher.cancel()

    supervisor.say(f"starting proxy on {plan.proxy_url} (log: {plan.run_dir / 'proxy.log'})")
    try:
        asyncio.run(serve())
    finally:
        for name in PROXY_LOGGERS:
            for handler in handlers:
                logging.getLogger(name).removeHandler(handler)
        for handler in handlers:
            handler.close()
        supervisor.say("proxy stopped")
    return died


def run(args: argparse.Namespace) -> int:
    """`python -m splitwise_local [serve]`: the whole system until Ctrl-C or SIGTERM; 1 after a
    failure."""
    console = Console(args.log_level)
    if (swept := sweep_orphans()) is not None:  # before the ports are checked: they held some
        console.say(LAUNCHER, swept)
    try:
        plan = make_plan(args, console)
    except LaunchError as exc:
        console.error(LAUNCHER, str(exc))
        return 1
    except KeyboardInterrupt:  # before any child exists: nothing to stop
        return 130
    supervisor = Supervisor(console, str(plan.run_dir), args.stop_grace)
    policy = RestartPolicy(
        mode=args.restart,
        health_deadline_s=args.health_deadline,
        max_restarts=args.max_restarts,
        ready_timeout_s=args.startup_timeout,
    )
    code = 0
    try:
        with supervisor.stop_requests_raise():
            if plan.prometheus is not None:  # first in, last out: it sees the whole run
                supervisor.start_stage([plan.prometheus], args.startup_timeout)
            if plan.store is not None:
                supervisor.start_stage([plan.store], args.startup_timeout)
            engines = [(engine.child, engine.readiness) for engine in plan.engines]
            supervisor.start_stage(engines, args.startup_timeout)
            supervisor.supervise(policy)
            if serve_proxy(plan, supervisor, args.api_key):
                code = 1
    except StartupError as exc:
        console.error(LAUNCHER, str(exc))
        code = 1
    except StopRequested as exc:
        supervisor.say(f"{exc} received")
    finally:
        plan.proxy_socket.close()
        supervisor.stop_all()
    supervisor.say("stopped" if code == 0 else "stopped after a failure")
    return code
