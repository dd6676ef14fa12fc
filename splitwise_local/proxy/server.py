"""`python -m splitwise_local proxy`: serve the proxy app with uvicorn.

Endpoints come from `--prefill` / `--decode`, else from `PREFILL_ENDPOINTS` /
`DECODE_ENDPOINTS` in the environment, else from a `.env` file in the working directory (the
environment wins over the file, as python-dotenv does by default). The API key likewise comes
from `--api-key`, `PROXY_API_KEY` or `.env`. KV-aware routing needs `--model` (the engines'
checkpoint) and, to ask the store, `--config` (the engines' splitwise YAML); without them
`--disagg auto` sends every request through prefill.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uvicorn
from dotenv import dotenv_values
from pydantic import ValidationError

from splitwise_local.hardware.device import detect_device
from splitwise_local.hardware.dtype import ProbeFailed, cpu_dtype
from splitwise_local.models.checkpoint import ModelError
from splitwise_local.models.hub import resolve_model
from splitwise_local.proxy.settings import (
    API_KEY_ENV,
    DECODE_ENV,
    DEFAULT_ADMISSION_TTFT_S,
    DEFAULT_DISAGG_THRESHOLD_TOKENS,
    DEFAULT_ITL_OBJECTIVE_MS,
    PREFILL_ENV,
    ProxySettings,
    split_endpoints,
)
from splitwise_local.tracing import DEFAULT_PROTOCOL, PROTOCOL_ENV, PROTOCOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `proxy` subcommand's options (settings may also come from the environment)."""
    _serving_arguments(parser)
    _routing_arguments(parser)
    _admission_arguments(parser)
    _tracing_arguments(parser)


def _serving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8030, help="port (default: %(default)s)")
    parser.add_argument(
        "--prefill", metavar="URL[,URL]", help=f"prefill engine URLs (else ${PREFILL_ENV})"
    )
    parser.add_argument(
        "--decode", metavar="URL[,URL]", help=f"decode engine URLs (else ${DECODE_ENV})"
    )
    parser.add_argument(
        "--api-key",
        help=f"Bearer token callers must send; forwarded to engines (else ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--no-fallback",
        dest="fallback_to_decode",
        action="store_false",
        help="fail a request whose prefill fails, instead of letting decode compute the prompt",
    )
    parser.add_argument("--prefill-timeout", type=float, metavar="S", dest="prefill_timeout_s")
    parser.add_argument(
        "--decode-timeout",
        type=float,
        metavar="S",
        dest="decode_timeout_s",
        help="longest wait for the next bytes of a decode answer",
    )
    parser.add_argument("--max-body-bytes", type=int, metavar="N")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")


def _routing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing")
    group.add_argument(
        "--disagg",
        choices=["auto", "always", "never"],
        help="auto (default): through prefill only when the prompt's uncached part is long; "
        "always: through prefill; never: decode engines alone",
    )
    group.add_argument(
        "--disagg-threshold",
        type=int,
        metavar="TOKENS",
        dest="disagg_threshold_tokens",
        help="auto: prompts with fewer uncached tokens go straight to decode "
        f"({DEFAULT_DISAGG_THRESHOLD_TOKENS})",
    )
    group.add_argument(
        "--itl-objective",
        type=float,
        metavar="MS",
        dest="itl_objective_ms",
        help="auto: never send a prompt straight to a decode engine whose running streams "
        f"would then wait longer than this between two tokens ({DEFAULT_ITL_OBJECTIVE_MS:g}; "
        "0: off)",
    )
    group.add_argument(
        "--model",
        help="the engines' model (folder, Hugging Face id or short name): tokenizer and keys "
        "for KV-aware routing",
    )
    group.add_argument(
        "--config",
        dest="kv_config",
        help="the engines' splitwise YAML: the store auto routing asks (with --model)",
    )
    group.add_argument(
        "--dtype",
        dest="kv_dtype",
        help="the engines' KV cache dtype (default: what an engine on this host runs: the "
        "CPU's fastest, as the launcher chooses it, or the checkpoint's on GPUs)",
    )
    group.add_argument("--tp", type=int, dest="tp_size", help="the engines' tensor-parallel size")
    group.add_argument(
        "--route-detail",
        action="store_true",
        default=None,
        help="show callers each request's route (x-splitwise-route: path, reason, stored "
        "tokens, engines) and engine addresses in errors and /health; off by default, since "
        "it tells any caller whether another caller's prompt is stored",
    )


def _admission_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission")
    group.add_argument(
        "--admission",
        action="store_true",
        default=None,
        help="refuse a request (429, Retry-After) while its engines have more prompt tokens "
        "queued than the bound; off, the queue and the bound are only measured (/metrics)",
    )
    group.add_argument(
        "--admission-tokens",
        type=int,
        metavar="TOKENS",
        help="the bound on each engine role's queued prompt tokens (default: measured, what "
        "the role clears within --admission-ttft)",
    )
    group.add_argument(
        "--admission-ttft",
        type=float,
        metavar="S",
        dest="admission_ttft_s",
        help=f"the time to first token the measured bound aims at ({DEFAULT_ADMISSION_TTFT_S})",
    )


def _tracing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracing")
    group.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="send an OpenTelemetry trace of every request here (off by default)",
    )
    group.add_argument(
        "--otlp-traces-protocol",
        choices=list(PROTOCOLS),
        help=f"the endpoint's OTLP protocol (default: ${PROTOCOL_ENV}, else {DEFAULT_PROTOCOL})",
    )


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ProxySettings:
    """Merges the command line over the environment; raises ValueError naming what is missing."""
    values: dict[str, Any] = {"fallback_to_decode": args.fallback_to_decode}
    for role, flag, var in (
        ("prefill", args.prefill, PREFILL_ENV),
        ("decode", args.decode, DECODE_ENV),
    ):
        urls = split_endpoints(flag if flag is not None else environ.get(var))
        if not urls and not (role == "prefill" and args.disagg == "never"):
            raise ValueError(f"no {role} engines: pass --{role} URL[,URL] or set {var}")
        values[role] = urls
    api_key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV)
    if api_key:
        values["api_key"] = api_key
    protocol = args.otlp_traces_protocol or environ.get(PROTOCOL_ENV)
    if protocol:
        values["otlp_traces_protocol"] = protocol
    for name in (
        "prefill_timeout_s", "decode_timeout_s", "max_body_bytes", "disagg",
        "disagg_threshold_tokens", "itl_objective_ms", "model", "kv_config", "kv_dtype", "tp_size",
        "route_detail", "admission", "admission_tokens", "admission_ttft_s", "otlp_traces_endpoint",
    ):  # fmt: skip
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    try:
        return ProxySettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ValueError(f"invalid {where}: {message}") from None


def environment(cwd: Path) -> dict[str, str]:
    """The process environment over the working directory's `.env` file (if any)."""
    from_file = {k: v for k, v in dotenv_values(cwd / ".env").items() if v is not None}
    return {**from_file, **os.environ}


def local_engine_dtype() -> str:
    """The dtype an engine started on this host runs (keys depend on it): on the CPU the one
    the launcher measures as fastest, on GPUs the checkpoint's (vLLM's "auto")."""
    return cpu_dtype().dtype if detect_device() == "cpu" else "auto"


def run(args: argparse.Namespace) -> int:
    """`python -m splitwise_local proxy`: serves until Ctrl-C or SIGTERM; 2 on bad settings, 1
    if it could not start."""
    # Heavy (aiohttp, starlette, numpy: most of a second): only when serving, so that
    # `proxy --help` stays instant.
    from splitwise_local.proxy.app import build_app

    try:
        if args.model is not None:  # a folder, Hub id or short name, as `engine --model` takes
            args.model = str(resolve_model(args.model).folder)
            if args.kv_dtype is None:
                args.kv_dtype = local_engine_dtype()
        settings = settings_from_args(args, environment(Path.cwd()))
    except (ValueError, ModelError, ProbeFailed) as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info(
        "proxy on http://%s:%d: prefill %s, decode %s",
        args.host,
        args.port,
        ", ".join(settings.prefill),
        ", ".join(settings.decode),
    )
    config = uvicorn.Config(
        build_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
