"""`--connector lmcache`: LMCache's own stack (vLLM's in-tree `LMCacheConnectorV1`) on our store.

Our config keeps LMCache's names for the settings the two share, so LMCache's YAML file is a
one-to-one translation of ours (LMCache 0.5.6 names on the right):

| ours                       | LMCache                                                   |
|----------------------------|-----------------------------------------------------------|
| `chunk_size`               | `chunk_size`                                              |
| `local_device: cpu / cuda` | `local_cpu: true / false` (LMCache's own telemetry maps   |
|                            | `local_cpu` back to `local_device` this way)              |
| `remote_url`               | `remote_url`: our store's `lm://HOST:PORT`, where it      |
|                            | speaks LMCache's protocol                                 |
| `remote_serde`             | `remote_serde` (naive, kivi, cachegen: both have all 3)   |
| `max_local_cpu_size`       | `max_local_cpu_size` (GB)                                 |
| `pipelined_backend`        | `use_layerwise` (LMCache v1's layer-by-layer pipeline)    |

vLLM's LMCache integration reads that file from `LMCACHE_CONFIG_FILE`.
LMCache's protocol cannot carry our store's auth token, so a config with `store_auth_token`
is refused here rather than producing engines the store turns away.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import yaml

from splitwise_local.config import SplitwiseConfig

CONNECTOR_NAME = "LMCacheConnectorV1"  # vLLM's in-tree class, registered by its factory
CONFIG_ENV_VAR = "LMCACHE_CONFIG_FILE"


class LMCacheConfigError(ValueError):
    """Our config cannot be expressed as a working LMCache config; the message says why."""


def lmcache_settings(config: SplitwiseConfig, store_url: str | None = None) -> dict[str, Any]:
    """LMCache's config keys for `config`; `store_url` (lm://) overrides `remote_url`, for
    engines whose own config points at the store's shared memory instead."""
    url = store_url or config.remote_url
    if not url.startswith("lm://"):
        raise LMCacheConfigError(
            f"LMCache reaches the store over lm://HOST:PORT only, not {url!r}: set "
            "remote_url (or SPLITWISE_REMOTE_URL) to the store's TCP address"
        )
    if config.store_auth_token:
        raise LMCacheConfigError(
            "store_auth_token is set, but LMCache's lm:// protocol cannot carry a token, so "
            "the store would refuse LMCache's connections: unset it to use --connector lmcache"
        )
    return {
        "chunk_size": config.chunk_size,
        "local_cpu": config.local_device == "cpu",
        "max_local_cpu_size": config.max_local_cpu_size,
        "remote_url": url,
        "remote_serde": config.remote_serde,
        "use_layerwise": config.pipelined_backend,
    }


def write_lmcache_config(
    config: SplitwiseConfig, store_url: str | None = None, directory: Path | None = None
) -> Path:
    """Writes LMCache's file and returns its path. The name is the content's digest, so every
    engine of a run shares one file, rewriting it is harmless, and nothing piles up."""
    text = yaml.safe_dump(lmcache_settings(config, store_url), sort_keys=False)
    directory = directory or Path(tempfile.gettempdir()) / "splitwise-lmcache"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
            tmp.write(text)
        Path(tmp.name).replace(path)  # atomic: a reader never sees half a file
    return path


def kv_transfer_config(kv_role: str, extra_config: dict | None = None) -> dict[str, Any]:
    """The `--kv-transfer-config` that loads vLLM's in-tree LMCache connector in `kv_role`."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_role": kv_role,
        # A chunk that cannot be loaded means "compute it here", never a failed request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(extra_config or {}),
    }
