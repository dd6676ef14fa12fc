"""What a launch's settings name, looked up on this host: the device, the config (with this
launch's store token), the model, and the engines' vLLM arguments with the CPU's dtype.

The planners (plan.py) take these as data; everything here may read files, ask torch or
measure the CPU, and says what it found on the console.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from splitwise_local.config import ConfigError, SplitwiseConfig, load_config
from splitwise_local.hardware.device import Device, detect_device
from splitwise_local.hardware.dtype import ProbeFailed, cache_path, cpu_dtype
from splitwise_local.models.checkpoint import ModelError, default_model_dir
from splitwise_local.models.hub import Model, resolve_model
from splitwise_local.serve.console import Console
from splitwise_local.serve.engine import flag_value, merge_args
from splitwise_local.serve.settings import LaunchError, LaunchSettings
from splitwise_local.serve.supervisor import LAUNCHER


@dataclass(frozen=True)
class Resolved:
    """The device the engines run on, the config they share and the model they serve."""

    device: Device
    config: SplitwiseConfig
    model: Model


@dataclass(frozen=True)
class EngineArgs:
    """Every engine's vLLM arguments: the served name and dtype under the caller's own."""

    args: tuple[str, ...]
    served_model: str  # the name clients ask for the model by
    dtype_line: str | None = None  # the dtype and why, for the ready banner

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype (auto: the checkpoint's), which the proxy's keys must match."""
        dtype = flag_value(self.args, "--kv-cache-dtype") or "auto"
        return dtype if dtype != "auto" else flag_value(self.args, "--dtype") or "auto"


def resolve(settings: LaunchSettings, console: Console) -> Resolved:
    """Detects the device, reads the config and finds (or prepares) the model; raises
    LaunchError with the config's or the model's one-line problem."""
    device = detect_device() if settings.device == "auto" else settings.device
    try:
        config = load_config(settings.config)
        if settings.model is None and not default_model_dir().is_dir():
            console.say(LAUNCHER, "preparing the embedded model (first run only, about 30 s)")
        model = resolve_model(settings.model, lambda text: console.say(LAUNCHER, text))
    except (ConfigError, ModelError) as exc:
        raise LaunchError(str(exc)) from None
    console.say(LAUNCHER, serving_line(settings, model, device))
    return Resolved(device, with_launch_token(config, settings.connector), model)


def serving_line(settings: LaunchSettings, model: Model, device: Device) -> str:
    """One line: what is served, and where."""
    where = "on GPUs" if device == "cuda" else "on the CPU"
    if device == "cpu" and settings.device == "auto":
        where += " (no GPU found)"
    which = f"the embedded model {model.name}" if settings.model is None else f"model {model.name}"
    return f"serving {which} {where} ({model.folder})"


def with_launch_token(config: SplitwiseConfig, connector: str) -> SplitwiseConfig:
    """With our connector and no configured token, one for this launch: the store requires it,
    the engines' connectors seal their chunks with it, and the proxy's lookups present it; all
    read it from the run's config file, which only this user can read. (LMCache's protocol
    cannot carry one.)"""
    if connector != "splitwise" or config.store_auth_token:
        return config
    return config.model_copy(update={"store_auth_token": secrets.token_urlsafe(32)})


def engine_args(settings: LaunchSettings, resolved: Resolved, console: Console) -> EngineArgs:
    """The engines' vLLM arguments: the model's name to serve it by, the dtype, then the
    caller's arguments after `--`."""
    named = merge_args(["--served-model-name", resolved.model.name], settings.extra)
    args, line = engine_dtype(resolved.device, named, console)
    served = flag_value(args, "--served-model-name") or resolved.model.name
    return EngineArgs(tuple(args), served, line)


def engine_dtype(device: str, extra: list[str], console: Console) -> tuple[list[str], str | None]:
    """The engines' vLLM arguments with the dtype this CPU runs fastest (unless the caller's
    `--dtype` says otherwise), and a line saying which and why. GPUs keep vLLM's own choice."""
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
