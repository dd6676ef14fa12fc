"""The `serve` command line: its options in groups, and `settings_from_args`, which turns what
was parsed into `LaunchSettings` once, at the entry point. The parser's defaults are the
settings' own; a value out of range is a `LaunchError` naming the option, before anything
starts."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from splitwise_local.serve.console import LEVELS
from splitwise_local.serve.settings import DEFAULTS, LaunchError, LaunchSettings, proxy_field
from splitwise_local.tracing import PROTOCOLS


def settings_from_args(args: argparse.Namespace) -> LaunchSettings:
    """The settings the parsed command line asks for (`args.extra`: what followed a bare `--`);
    raises LaunchError naming the first bad option."""
    values = {name: value for name, value in vars(args).items() if name != "subcommand"}
    values["extra"] = tuple(values.get("extra", ()))
    try:
        return LaunchSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across options: the message names them
            raise LaunchError(message) from None
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise LaunchError(f"{option} {error['input']!r}: {message}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options (the default command), in groups; their defaults are
    `LaunchSettings`'."""
    parser.epilog = "Arguments after a bare `--` go to every vLLM engine unchanged."
    add_engine_arguments(parser.add_argument_group("model and engines"))
    add_port_arguments(parser.add_argument_group("ports"))
    add_store_arguments(parser.add_argument_group("KV transfer and store"))
    add_routing_arguments(parser.add_argument_group("proxy: routing"))
    add_caller_arguments(parser.add_argument_group("proxy: callers"))
    add_timeout_arguments(parser.add_argument_group("proxy: timeouts and back-off"))
    add_admission_arguments(parser.add_argument_group("proxy: admission"))
    add_supervision_arguments(parser.add_argument_group("supervision"))
    add_observability_arguments(parser.add_argument_group("logs and metrics"))
    parser.set_defaults(**DEFAULTS.model_dump(exclude={"extra"}))


Group = argparse._ArgumentGroup  # what add_argument_group returns (argparse has no public name)


def proxy_help(name: str) -> str:
    """The proxy's own description of its setting `name`."""
    return str(proxy_field(name).description)


def add_engine_arguments(group: Group) -> None:
    """What is served, and by how many engines where."""
    group.add_argument(
        "--model",
        help="checkpoint folder, Hugging Face id or short name such as DeepSeek-V2-Lite "
        "(default: the embedded SmolLM2)",
    )
    group.add_argument(
        "--config", help="splitwise YAML config (default: $SPLITWISE_CONFIG_FILE, built-ins)"
    )
    group.add_argument("--device", choices=["auto", "cpu", "cuda"])
    group.add_argument("--prefill", type=int, metavar="N", help="prefill engines (%(default)s)")
    group.add_argument("--decode", type=int, metavar="M", help="decode engines (%(default)s)")
    group.add_argument(
        "--prefill-gpus",
        help="GPUs of the prefill engines, split evenly between them (default: the first ones)",
    )
    group.add_argument(
        "--decode-gpus",
        help="GPUs of the decode engines, split evenly between them (default: the next ones)",
    )
    group.add_argument("--tp", type=int, metavar="K", help="GPUs per engine (tensor-parallel size)")
    group.add_argument(
        "--kv-cache-gb", type=int, help="on the CPU: each engine's KV cache space (%(default)s)"
    )
    group.add_argument(
        "--disable-mla",
        action="store_true",
        help="set VLLM_MLA_DISABLE=1: MLA models run as plain attention",
    )


def add_port_arguments(group: Group) -> None:
    """Where each component listens; engines of a role take consecutive ports."""
    group.add_argument("--host", help="the proxy's address (%(default)s)")
    group.add_argument("--port", type=int, help="the proxy's port (%(default)s)")
    group.add_argument(
        "--prefill-port",
        type=int,
        help="the first prefill engine's port; the others take the next ones (%(default)s)",
    )
    group.add_argument(
        "--decode-port",
        type=int,
        help="the first decode engine's port; the others take the next ones (%(default)s)",
    )
    group.add_argument(
        "--store-port", type=int, help="the store's TCP port (default: the config's lm:// port)"
    )
    group.add_argument(
        "--store-metrics-port",
        type=int,
        help="the store's Prometheus /metrics port (default: the store's port + 1)",
    )


def add_store_arguments(group: Group) -> None:
    """How KV moves between the engines, and which store holds it."""
    group.add_argument(
        "--connector",
        choices=["splitwise", "lmcache", "none"],
        help="KV transfer between the engines; lmcache: vLLM's LMCacheConnectorV1 on our store "
        "(CUDA only); none: plain engines, no store",
    )
    group.add_argument(
        "--store",
        choices=["splitwise", "mooncake"],
        help="the KV store: ours, or a local mooncake_master (Mooncake Store over TCP)",
    )


def add_routing_arguments(group: Group) -> None:
    """How the proxy routes each request (proxy/routing.py)."""
    group.add_argument(
        "--disagg",
        choices=["auto", "always", "never"],
        help="auto: per request, through prefill only when the prompt's uncached part is long "
        "(or straight to decode while prefill is saturated); always: through prefill; "
        "never: decode engines alone",
    )
    group.add_argument(
        "--disagg-threshold",
        type=int,
        metavar="TOKENS",
        help="auto: prompts with fewer uncached tokens go straight to decode (%(default)s)",
    )
    group.add_argument(
        "--busy-tokens",
        type=int,
        metavar="TOKENS",
        help="auto: an engine with this many prompt tokens pending is saturated; while every "
        "prefill engine is, requests go straight to a decode engine that is not (%(default)s)",
    )
    group.add_argument(
        "--itl-objective",
        type=float,
        metavar="MS",
        help=proxy_help("itl_objective_ms") + " (%(default)s)",
    )
    policies = ["kv_affinity", "least_loaded"]
    group.add_argument(
        "--prefill-policy",
        choices=policies,
        help="which prefill engine: the one that last saw the prompt's prefix, or the least "
        "loaded (%(default)s)",
    )
    group.add_argument(
        "--decode-policy", choices=policies, help="which decode engine (%(default)s)"
    )
    group.add_argument(
        "--affinity-chunks",
        type=int,
        metavar="N",
        help="kv_affinity: chunk keys remembered per engine (%(default)s)",
    )
    add_fallback_arguments(group)


def add_fallback_arguments(group: Group) -> None:
    """Where a request goes when a hop fails, and what callers see of its route."""
    group.add_argument(
        "--no-fallback",
        dest="fallback_to_decode",
        action="store_false",
        help="fail a request whose prefill fails, instead of letting decode compute the prompt",
    )
    group.add_argument(
        "--no-fallback-to-prefill",
        dest="fallback_to_prefill",
        action="store_false",
        help="while no decode engine is reachable, answer 503 instead of serving whole "
        "requests on a prefill engine",
    )
    group.add_argument(
        "--route-detail",
        action="store_true",
        help="show callers each request's route (x-splitwise-route header) and engine addresses "
        "in errors and /health; off by default: it tells any caller whether another caller's "
        "prompt is stored",
    )


def add_caller_arguments(group: Group) -> None:
    """What the proxy asks of its callers, and how many connections it keeps to the engines."""
    group.add_argument("--api-key", help="require this Bearer token from the proxy's callers")
    group.add_argument(
        "--max-body-bytes", type=int, metavar="N", help="largest request body (%(default)s)"
    )
    group.add_argument(
        "--retry-after",
        type=int,
        metavar="SECONDS",
        help="Retry-After of a 503 when no engine can take a request (%(default)s)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="pooled connections to the engines (%(default)s)",
    )


def add_timeout_arguments(group: Group) -> None:
    """How long the proxy waits for the engines and the store, and skips one that failed."""
    group.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="connecting to an engine (%(default)s)",
    )
    group.add_argument(
        "--prefill-timeout",
        type=float,
        metavar="SECONDS",
        help="a whole prefill request (%(default)s)",
    )
    group.add_argument(
        "--decode-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for the next bytes of a decode answer (%(default)s)",
    )
    group.add_argument(
        "--health-timeout",
        type=float,
        metavar="SECONDS",
        help="each engine's answer to /health (%(default)s)",
    )
    group.add_argument(
        "--store-timeout",
        type=float,
        metavar="SECONDS",
        help="the store's answer to a routing lookup (%(default)s)",
    )
    group.add_argument(
        "--backoff-initial",
        type=float,
        metavar="SECONDS",
        help="an engine (or the store) that failed is skipped this long, doubling per failure "
        "(%(default)s)",
    )
    group.add_argument(
        "--backoff-max",
        type=float,
        metavar="SECONDS",
        help="the longest it is skipped (%(default)s)",
    )


def add_admission_arguments(group: Group) -> None:
    """Whether the proxy refuses requests its engines cannot start in time (proxy/admission.py);
    the help is the proxy's own description of each setting."""
    group.add_argument("--admission", action="store_true", help=proxy_help("admission"))
    group.add_argument(
        "--admission-tokens", type=int, metavar="TOKENS", help=proxy_help("admission_tokens")
    )
    group.add_argument(
        "--admission-ttft",
        type=float,
        metavar="SECONDS",
        help=proxy_help("admission_ttft_s") + " (%(default)s)",
    )


def add_supervision_arguments(group: Group) -> None:
    """How long to wait for the children, and what to do when one dies or freezes."""
    group.add_argument(
        "--startup-timeout",
        type=float,
        metavar="SECONDS",
        help="longest wait for a component to be ready, at start and after a restart (%(default)s)",
    )
    group.add_argument(
        "--stop-grace",
        type=float,
        metavar="SECONDS",
        help="a component that has not stopped this long after SIGTERM is killed (%(default)s)",
    )
    group.add_argument(
        "--restart",
        choices=["on-failure", "never"],
        help="a child that dies or freezes while serving: restart it with back-off "
        "(on-failure) or stop everything with exit 1 (never)",
    )
    group.add_argument(
        "--health-deadline",
        type=float,
        metavar="SECONDS",
        help="a child whose health check fails this long is frozen, and restarted (%(default)s)",
    )
    group.add_argument(
        "--max-restarts",
        type=int,
        metavar="N",
        help="restarts of one child within 10 minutes before giving up (stop, exit 1) "
        "(%(default)s)",
    )


def add_observability_arguments(group: Group) -> None:
    """Where the logs go, what the console shows, and the optional Prometheus."""
    group.add_argument("--run-dir", help="folder for logs and the per-run config (runs/<time>)")
    group.add_argument(
        "--log-level",
        choices=list(LEVELS),
        help="children's lines shown on the console (the log files keep all)",
    )
    group.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (Debian's), scraping the proxy, every engine and the store",
    )
    group.add_argument("--prometheus-port", type=int, help="Prometheus's port (%(default)s)")
    group.add_argument(
        "--scrape-interval",
        type=float,
        metavar="SECONDS",
        help="how often Prometheus scrapes each component (%(default)s)",
    )
    group.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="send OpenTelemetry traces of every request here: the proxy's spans, each "
        "engine's (vLLM's --otlp-traces-endpoint) and the connector's saves and loads, in one "
        "trace per request (off by default)",
    )
    group.add_argument(
        "--otlp-traces-protocol",
        choices=list(PROTOCOLS),
        help="the endpoint's OTLP protocol (%(default)s; http/protobuf: /v1/traces is added to "
        "a URL without a path)",
    )
