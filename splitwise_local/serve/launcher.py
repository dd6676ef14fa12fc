"""`python -m splitwise_local [serve]`: the whole system on one host, in one command.

Start order: the KV store, then every engine together (`--prefill N --decode M`, one prefill and
one decode by default, each on its own GPUs or its own CPU cores), then the proxy, served in
this process. Everything that can be checked before a process starts is checked first (model
folder, config, free ports, placement), so a mistake costs no startup time and leaves nothing
behind. Each child logs to a file in the run folder and, at the chosen level, to the console.
Ctrl-C or SIGTERM stops the proxy, then the engines, then the store. A child that dies or
freezes while serving is restarted (`--restart on-failure`, the default; the proxy routes around
it meanwhile) or stops everything with a non-zero exit (`--restart never`, or too many restarts).

The walk: options.py and settings.py (what was asked) -> resolve.py (device, config, model) ->
plan.py (pure decisions) -> system.py (the children) -> `launch` here (the supervisor, then the
proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import uvicorn

from splitwise_local.proxy.app import build_app
from splitwise_local.serve.banner import banner
from splitwise_local.serve.console import Console, ConsoleHandler
from splitwise_local.serve.leftovers import sweep_orphans
from splitwise_local.serve.options import add_arguments, settings_from_args
from splitwise_local.serve.placement import PlacementError, placement
from splitwise_local.serve.plan import plan_engines, plan_ports, plan_proxy, plan_store
from splitwise_local.serve.ports import listen, port_problems
from splitwise_local.serve.resolve import engine_args, resolve
from splitwise_local.serve.settings import LaunchError, LaunchSettings
from splitwise_local.serve.supervisor import (
    LAUNCHER,
    POLL_S,
    ChildEvent,
    RestartPolicy,
    StartupError,
    StopRequested,
    Supervisor,
)
from splitwise_local.serve.system import (
    System,
    engine_member,
    pick_run_dir,
    prometheus_member,
    store_member,
)

__all__ = ["add_arguments", "run"]  # the subcommand's face (cli.py)
PROXY_LOGGERS = ("uvicorn", "splitwise_local.proxy")


def run(args: argparse.Namespace) -> int:
    """`python -m splitwise_local [serve]`: the whole system until Ctrl-C or SIGTERM; 1 after a
    failure, 2 for a bad option."""
    try:
        settings = settings_from_args(args)
    except LaunchError as exc:
        Console().error(LAUNCHER, str(exc))
        return 2
    return launch(settings)


def launch(settings: LaunchSettings) -> int:
    """Starts the system `settings` asks for, serves until a stop, and stops it in order."""
    console = Console(settings.log_level)
    if (swept := sweep_orphans()) is not None:  # before the ports are checked: they held some
        console.say(LAUNCHER, swept)
    try:
        system = prepare(settings, console)
    except LaunchError as exc:
        console.error(LAUNCHER, str(exc))
        return 1
    except KeyboardInterrupt:  # before any child exists: nothing to stop
        return 130
    supervisor = Supervisor(console, str(system.run_dir), settings.stop_grace)
    code = 0
    try:
        with supervisor.stop_requests_raise():
            start(system, supervisor, settings)
            if serve_proxy(system, supervisor):
                code = 1
    except StartupError as exc:
        console.error(LAUNCHER, str(exc))
        code = 1
    except StopRequested as exc:
        supervisor.say(f"{exc} received")
    finally:
        system.proxy_socket.close()
        supervisor.stop_all()
    supervisor.say("stopped" if code == 0 else "stopped after a failure")
    return code


def prepare(settings: LaunchSettings, console: Console) -> System:
    """Resolves, plans and checks everything; raises LaunchError. Creates only the run folder,
    its config and, last, the proxy's listening socket."""
    resolved = resolve(settings, console)
    store = plan_store(settings, resolved)
    if problems := port_problems(plan_ports(settings, store)):
        raise LaunchError("; ".join(problems))
    try:
        where = placement(settings, resolved.device, lambda line: console.say(LAUNCHER, line))
    except PlacementError as exc:
        raise LaunchError(str(exc)) from None
    args = engine_args(settings, resolved, console)

    run_dir = pick_run_dir(settings.run_dir)
    store_child, config_file = None, None
    if store is not None:
        store_child, config_file = store_member(resolved.config, store, run_dir, console)
    engines = plan_engines(settings, resolved, args, where, store, config_file)
    members = [engine_member(engine, run_dir, console) for engine in engines]
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    proxy_url = f"http://{shown_host}:{settings.port}"
    prometheus = None
    if settings.prometheus:
        prometheus = prometheus_member(settings, proxy_url, members, store, run_dir, console)
    try:
        proxy_socket = listen(settings.host, settings.port)
    except OSError as exc:
        address = f"{settings.host}:{settings.port}"
        raise LaunchError(f"cannot listen on {address}: {exc.strerror}") from None
    return System(
        run_dir=run_dir,
        prometheus=prometheus,
        store=store_child,
        engines=members,
        proxy=plan_proxy(settings, resolved, args, engines, config_file),
        proxy_url=proxy_url,
        proxy_socket=proxy_socket,
        served_model=args.served_model,
        dtype_line=args.dtype_line,
        prometheus_url=f"http://127.0.0.1:{settings.prometheus_port}" if prometheus else None,
    )


def start(system: System, supervisor: Supervisor, settings: LaunchSettings) -> None:
    """Starts Prometheus, the store and the engines, stage by stage, each once the one before
    is ready; then watches them all by the restart policy."""
    for stage in (system.prometheus, system.store):
        if stage is not None:
            supervisor.start_stage([stage], settings.startup_timeout)
    engines = [(engine.child, engine.readiness) for engine in system.engines]
    supervisor.start_stage(engines, settings.startup_timeout)
    policy = RestartPolicy(
        mode=settings.restart,
        health_deadline_s=settings.health_deadline,
        max_restarts=settings.max_restarts,
        ready_timeout_s=settings.startup_timeout,
    )
    supervisor.supervise(policy)


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


def remove_logging(handlers: list[logging.Handler]) -> None:
    """Takes `proxy_logging`'s handlers off the proxy's loggers and closes them."""
    for name in PROXY_LOGGERS:
        for handler in handlers:
            logging.getLogger(name).removeHandler(handler)
    for handler in handlers:
        handler.close()


def proxy_server(system: System, supervisor: Supervisor) -> uvicorn.Server:
    """The proxy's server. The proxy hears of every engine's death and return from the
    supervisor, and its /metrics shows the restarts."""
    app = build_app(system.proxy)
    proxy = app.state.proxy
    proxy.metrics.registry.register(supervisor.collector())
    engine_urls = {engine.child: engine.url for engine in system.engines}

    def tell_proxy(event: ChildEvent) -> None:
        if (url := engine_urls.get(event.child)) is not None:
            proxy.engine_state(url, event.up, event.cause)

    supervisor.listen(tell_proxy)
    return uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5))


def serve_proxy(system: System, supervisor: Supervisor) -> bool:
    """Serves the proxy until a stop signal (re-raised as StopRequested) or until the
    supervisor gives up on a child; returns True in that case."""
    server = proxy_server(system, supervisor)
    handlers = proxy_logging(supervisor.console, system.run_dir / "proxy.log")
    died = False

    async def watch() -> None:
        nonlocal died
        announced = False
        while not server.should_exit:
            if server.started and not announced:
                supervisor.say(banner(system))
                announced = True
            if supervisor.failed.is_set():
                supervisor.console.error(LAUNCHER, supervisor.failure or "a child failed")
                died = True
                server.should_exit = True
            await asyncio.sleep(POLL_S)

    async def serve() -> None:
        watcher = asyncio.create_task(watch())
        try:
            await server.serve(sockets=[system.proxy_socket])
        finally:
            watcher.cancel()

    supervisor.say(f"starting proxy on {system.proxy_url} (log: {system.run_dir / 'proxy.log'})")
    try:
        asyncio.run(serve())
    finally:
        remove_logging(handlers)
        supervisor.say("proxy stopped")
    return died
