"""The project's YAML config: LMCache's keys, validated, with environment overrides.

LMCache deployments are configured with a small YAML file; users know those keys, so they stay:
`chunk_size`, `local_device`, `remote_url`, `remote_serde`, `max_local_cpu_size` (GB) and
`pipelined_backend`, and LMCache's disk tier, `local_disk` (a directory, `file://` allowed) with
`max_local_disk_size` (GB), which the store keeps below its DRAM. A few keys of our own sit beside
them (serde parameters, the store's auth token, Mooncake settings). Anything else is a mistake and
is rejected with the key and the file named, because a misspelt key that is silently ignored is the
worst kind of config bug.

Environment overrides: `SPLITWISE_<KEY>` (upper case, e.g. `SPLITWISE_CHUNK_SIZE=32`) wins over
the file. The config file itself comes from `--config`, else `SPLITWISE_CONFIG_FILE`, else
`LMCACHE_CONFIG_FILE` (as LMCache's own deployments set it), else the defaults below, which are
`configs/cpu.yaml`'s (tests/test_config.py keeps the two equal).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SPLITWISE_"
CONFIG_ENV_VARS = ("SPLITWISE_CONFIG_FILE", "LMCACHE_CONFIG_FILE")
REMOTE_SCHEMES = ("lm", "shm", "mooncakestore")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and source."""


class SerdeOptions(BaseModel):
    """Parameters of the compressing serdes; the payload header records them for readers."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[2, 4, 8] = 4
    group_size: int = Field(default=64, gt=0, le=4096)  # 32 cannot reach kivi's ratios


class MooncakeOptions(BaseModel):
    """Settings for the `mooncakestore://` backend, named as in Mooncake's own config."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    local_hostname: str = "127.0.0.1"
    metadata_server: str = "P2PHANDSHAKE"
    global_segment_size: int = Field(default=512 * 1024 * 1024, ge=0)  # 0: lends no memory
    local_buffer_size: int = Field(default=128 * 1024 * 1024, gt=0)


class SplitwiseConfig(BaseModel):
    """Validated settings shared by the store, the connector and the launcher."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    chunk_size: int = Field(default=256, gt=0, le=65536, description="tokens per stored KV chunk")
    local_device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="where the connector stages KV before it goes to the store"
    )
    remote_url: str = Field(
        default="lm://127.0.0.1:10080",
        description="the store: lm://host:port (TCP), shm://NAME (same host), mooncakestore://",
    )
    remote_serde: Literal["naive", "kivi", "cachegen"] = "naive"
    max_local_cpu_size: float = Field(
        default=2.0, gt=0, le=4096, description="GB of KV the store may hold"
    )
    local_disk: str | None = Field(
        default=None,
        description="directory of the store's disk tier below DRAM (file:// allowed); none: DRAM",
    )
    max_local_disk_size: float = Field(
        default=0.0, ge=0, description="GB of files the store's disk tier may hold"
    )
    pipelined_backend: bool = Field(
        default=False,
        description="LMCache's use_layerwise; our connector loads asynchronously and ignores it",
    )
    serde_options: SerdeOptions = Field(default_factory=SerdeOptions)
    store_auth_token: str | None = None
    mooncake: MooncakeOptions = Field(default_factory=MooncakeOptions)

    @field_validator("remote_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in REMOTE_SCHEMES or not rest:
            raise ValueError(f"expected one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}...")
        return value

    @field_validator("local_disk")
    @classmethod
    def _disk_path(cls, value: str | None) -> str | None:
        """LMCache's form `file:///path/` or a plain path; one directory (no sharding)."""
        if value is None:
            return None
        path = value.removeprefix("file://")
        if not path or "," in path:
            raise ValueError("expected one directory (LMCache's path list is not supported)")
        return path

    @model_validator(mode="after")
    def _disk_has_room(self) -> SplitwiseConfig:
        if self.local_disk and self.max_local_disk_size <= 0:
            raise ValueError("local_disk needs max_local_disk_size > 0 (GB)")
        return self


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: invalid value for '{key}': {first['msg']} (got {first.get('input')!r})"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in SplitwiseConfig.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            # YAML parsing gives "32" -> 32 and "false" -> False, as in a config file.
            overrides[name] = yaml.safe_load(raw)
    return overrides


def config_path_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    environ = os.environ if environ is None else environ
    for var in CONFIG_ENV_VARS:
        if environ.get(var):
            return Path(environ[var])
    return None


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> SplitwiseConfig:
    """Reads `path` (or the file named by the environment), applies `SPLITWISE_*` overrides."""
    environ = os.environ if environ is None else environ
    path = Path(path) if path is not None else config_path_from_env(environ)
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of keys, got {type(loaded).__name__}")
        data = dict(loaded or {})
    overrides = _env_overrides(environ)
    if overrides:
        source += " + environment " + ", ".join(ENV_PREFIX + k.upper() for k in overrides)
    try:
        return SplitwiseConfig.model_validate({**data, **overrides})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def dump_config(config: SplitwiseConfig, path: Path) -> Path:
    """Writes a config that `load_config` reads back unchanged (used to hand it to children),
    readable by this user only: it may hold the store's token."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(text)
    return path
