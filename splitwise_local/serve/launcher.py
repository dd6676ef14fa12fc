"""`python -m splitwise_local [serve]`: the whole system on one host, in one command.

Start order: the KV store, then the prefill and decode engines together (each on its own GPUs,
or its own half of the CPU cores), then the proxy, served in this process. Everything that can
be checked before a process starts is checked first (model folder, config, free ports), so a
mistake costs no startup time and leaves nothing behind. Each child logs to a file in the run
folder and, at the chosen level, to the console. Ctrl-C or SIGTERM stops the proxy, then the
engines, then the store; a child that dies while serving stops everything, with a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitwise_local.serve.console import LEVELS, Console, ConsoleHandler
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.supervisor import (
    LAUNCHER,
    POLL_S,
    Readiness,
    StartupError,
    StopRequested,
    Supervisor,
)

if TYPE_CHECKING:
    from splitwise_local.config import SplitwiseConfig

DEFAULT_STORE_PORT = 10080
PROXY_LOGGERS = ("uvicorn", "splitwise_local.proxy")
GPU_LIST = re.compile(r"^\d+(,\d+)*$")


class LaunchError(RuntimeError):
    """A problem found before anything started; the message is one line for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Arguments after a bare `--` go to both vLLM engines unchanged."
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument(
        "--config", help="splitwise YAML config (default: $SPLITWISE_CONFIG_FILE, built-ins)"
    )
    parser.add_argument("--port", type=int, default=8030, help="the proxy's port")
    parser.add_argument("--host", default="127.0.0.1", help="the proxy's address")
    parser.add_argument("--prefill-port", type=int, default=8010)
    parser.add_argument("--decode-port", type=int, default=8020)
    parser.add_argument(
        "--store-port", type=int, help="the store's TCP port (default: the config's lm:// port)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--prefill-gpus", help="CUDA_VISIBLE_DEVICES of the prefill engine (0)")
    parser.add_argument("--decode-gpus", help="CUDA_VISIBLE_DEVICES of the decode engine (1)")
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


@dataclass
class Plan:
    """Everything decided before the first process starts."""

    run_dir: Path
    store: tuple[Child, Readiness] | None
    engines: list[tuple[Child, Readiness]]
    prefill_url: str
    decode_url: str
    served_model: str
    proxy_url: str
    proxy_socket: socket.socket


def pick_run_dir(requested: str | None) -> Path:
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


def split_cores(cores: list[int]) -> tuple[str, str]:
    """The CPU cores this process may use, halved: the first half prefills, the rest decodes."""
    if len(cores) < 2:
        return str(cores[0]), str(cores[0])
    half = len(cores) // 2
    return ",".join(map(str, cores[:half])), ",".join(map(str, cores[half:]))


def check_gpus(role: str, value: str, count: int) -> str:
    if not GPU_LIST.match(value):
        raise LaunchError(f"--{role}-gpus {value!r}: expected GPU numbers like 0 or 0,1")
    missing = [gpu for gpu in map(int, value.split(",")) if gpu >= count]
    if missing:
        raise LaunchError(
            f"--{role}-gpus {value}: this machine has {count} GPU(s) (numbered from 0)"
        )
    return value


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


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2.0).status_code == 200


def store_responds(url: str, config: SplitwiseConfig) -> bool:
    from splitwise_local.store.backend import open_backend

    backend = open_backend(url, config)
    try:
        backend.stats()
    finally:
        backend.close()
    return True


def child_env(base: dict[str, str], run_dir: Path) -> dict[str, str]:
    return {**base, RUN_ENV: str(run_dir), "PYTHONUNBUFFERED": "1"}


def announce(console: Console, args: argparse.Namespace, model: Path, device: str) -> None:
    """One line: what is served, and where."""
    where = "on GPUs" if device == "cuda" else "on the CPU"
    if device == "cpu" and args.device == "auto":
        where += " (no GPU found)"
    which = f"the embedded model {model.name}" if args.model is None else f"model {model.name}"
    console.say(LAUNCHER, f"serving {which} {where} ({model})")


def placement(args: argparse.Namespace, device: str, console: Console) -> dict[str, dict]:
    """Per engine role: its GPUs (CUDA_VISIBLE_DEVICES) or its CPU cores (OMP binding)."""
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        return {
            "prefill": {"gpus": check_gpus("prefill", args.prefill_gpus or "0", count)},
            "decode": {"gpus": check_gpus("decode", args.decode_gpus or "1", count)},
        }
    if args.prefill_gpus or args.decode_gpus:
        console.say(LAUNCHER, "--prefill-gpus/--decode-gpus have no effect on the CPU")
    prefill, decode = split_cores(sorted(os.sched_getaffinity(0)))
    return {"prefill": {"cpu_cores": prefill}, "decode": {"cpu_cores": decode}}


def store_member(
    config: SplitwiseConfig, port: int, shm_url: str, run_dir: Path, console: Console
) -> tuple[tuple[Child, Readiness], Path]:
    """The store child, and the per-run config that points the engines at its arena."""
    from splitwise_local.config import dump_config

    engines_config = config.model_copy(update={"remote_url": shm_url})
    config_file = dump_config(engines_config, run_dir / "splitwise.yaml")
    # The store reads its capacity and auth token from the same file: no secret in `ps`.
    command = [sys.executable, "-m", "splitwise_local", "store", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--shm-name", shm_url.removeprefix("shm://")]
    command += ["--config", str(config_file)]
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
    from splitwise_local.models.checkpoint import ModelError, default_model_dir, resolve_model
    from splitwise_local.serve.engine import EngineSpec, detect_device, merge_args

    device = detect_device() if args.device == "auto" else args.device
    try:
        config = load_config(args.config)
        if args.model is None and not default_model_dir().is_dir():
            console.say(LAUNCHER, "preparing the embedded model (first run only, about 30 s)")
        model = resolve_model(args.model)
    except (ConfigError, ModelError) as exc:
        raise LaunchError(str(exc)) from None
    announce(console, args, model, device)

    wanted = {
        "proxy": (args.host, args.port, "--port"),
        "prefill engine": ("127.0.0.1", args.prefill_port, "--prefill-port"),
        "decode engine": ("127.0.0.1", args.decode_port, "--decode-port"),
    }
    use_store = args.connector != "none"
    mooncake = use_store and args.store == "mooncake"
    if mooncake:
        if args.connector == "lmcache":
            raise LaunchError("--store mooncake works with --connector splitwise only")
        store_port = args.store_port or MOONCAKE_MASTER_PORT
        wanted["mooncake master"] = ("127.0.0.1", store_port, "--store-port")
    elif use_store:
        store_port, shm_url = store_url(config.remote_url, args.store_port)
        wanted["store"] = ("127.0.0.1", store_port, "--store-port")
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
    check_ports(wanted)
    where = placement(args, device, console)

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
        store, config_file = store_member(config, store_port, shm_url, run_dir, console)

    extra = merge_args(["--served-model-name", model.name], args.extra)
    engines: dict[str, tuple[Child, Readiness]] = {}
    urls: dict[str, str] = {}
    for role, port in (("prefill", args.prefill_port), ("decode", args.decode_port)):
        spec = EngineSpec(
            model=model,
            port=port,
            role=role if use_store else "plain",
            config_file=config_file,
            device=device,  # type: ignore[arg-type]
            kv_cache_gb=args.kv_cache_gb,
            extra_args=extra,
            connector="lmcache" if lmcache_url else "splitwise",
            store_url=lmcache_url,
            **where[role],
        )
        env = child_env(spec.environment(), run_dir)
        if args.disable_mla:
            env["VLLM_MLA_DISABLE"] = "1"
        child = Child(f"{role} engine", spec.command(), env, run_dir / f"{role}.log", console)
        health = f"{spec.url}/health"
        engines[role] = (child, Readiness(lambda url=health: http_ok(url), f"GET {health}"))
        urls[role] = spec.url

    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    return Plan(
        run_dir=run_dir,
        store=store,
        engines=list(engines.values()),
        prefill_url=urls["prefill"],
        decode_url=urls["decode"],
        served_model=flag_value(extra, "--served-model-name") or model.name,
        proxy_url=f"http://{shown_host}:{args.port}",
        proxy_socket=listen(args.host, args.port),
    )


def banner(plan: Plan, api_key: str | None) -> str:
    """The ready message: the URL and a curl command to paste."""
    from splitwise_local.samples import SAMPLES, chat_request

    body = json.dumps(chat_request(plan.served_model, SAMPLES[0]))
    auth = f"-H {shlex.quote('Authorization: Bearer ' + api_key)} " if api_key else ""
    return (
        f"ready: {plan.proxy_url} (OpenAI-compatible; logs in {plan.run_dir}; "
        "Ctrl-C stops everything)\n"
        f"  curl {plan.proxy_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}-d {shlex.quote(body)}"
    )


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
    """Serves the proxy until a stop signal (re-raised as StopRequested) or a child's death;
    returns True when a child died."""
    import uvicorn

    from splitwise_local.proxy.app import build_app
    from splitwise_local.proxy.settings import ProxySettings

    settings = ProxySettings(prefill=[plan.prefill_url], decode=[plan.decode_url], api_key=api_key)
    config = uvicorn.Config(build_app(settings), log_config=None, timeout_graceful_shutdown=5)
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
            dead = supervisor.first_dead()
            if dead is not None:
                supervisor.report_death(dead)
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
    console = Console(args.log_level)
    try:
        plan = make_plan(args, console)
    except LaunchError as exc:
        console.error(LAUNCHER, str(exc))
        return 1
    except KeyboardInterrupt:  # before any child exists: nothing to stop
        return 130
    supervisor = Supervisor(console, str(plan.run_dir), args.stop_grace)
    code = 0
    try:
        with supervisor.stop_requests_raise():
            if plan.store is not None:
                supervisor.start_stage([plan.store], args.startup_timeout)
            supervisor.start_stage(plan.engines, args.startup_timeout)
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
