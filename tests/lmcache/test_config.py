"""`--connector lmcache`: LMCache's config generated from ours, read back by LMCache's own class,
and the engine command and environment vLLM's in-tree `LMCacheConnectorV1` is started with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lmcache.v1.config import LMCacheEngineConfig

from splitwise_local import cli
from splitwise_local.config import SplitwiseConfig, load_config
from splitwise_local.hardware.device import detect_device
from splitwise_local.serve.engine import EngineSpec
from splitwise_local.serve.lmcache_config import (
    CONFIG_ENV_VAR,
    LMCacheConfigError,
    lmcache_settings,
    write_lmcache_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"
SEED_KEYS = ("chunk_size", "remote_url", "remote_serde", "max_local_cpu_size")


def _lmcache_reads(path: Path) -> LMCacheEngineConfig:
    config = LMCacheEngineConfig.from_file(str(path))
    config.validate()
    return config


def test_the_seeds_example_loads_in_both_loaders() -> None:
    ours = load_config(EXAMPLE)
    theirs = _lmcache_reads(EXAMPLE)
    for key in SEED_KEYS:
        assert getattr(theirs, key) == getattr(ours, key), key
    assert (ours.chunk_size, ours.remote_url) == (32, "lm://localhost:8100")


def test_lmcache_config_file_is_honoured_as_in_the_seed() -> None:
    assert load_config(environ={CONFIG_ENV_VAR: str(EXAMPLE)}).chunk_size == 32


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        ({}, {"local_cpu": True, "use_layerwise": False, "remote_serde": "naive"}),
        (
            {"local_device": "cuda", "pipelined_backend": True, "remote_serde": "cachegen"},
            {"local_cpu": False, "use_layerwise": True, "remote_serde": "cachegen"},
        ),
        ({"remote_serde": "kivi", "chunk_size": 64}, {"remote_serde": "kivi", "chunk_size": 64}),
    ],
)
def test_each_seed_key_maps_to_lmcaches_and_lmcache_reads_it_back(
    tmp_path: Path, ours: dict, expected: dict
) -> None:
    config = SplitwiseConfig(remote_url="lm://127.0.0.1:10080", max_local_cpu_size=3, **ours)
    path = write_lmcache_config(config, directory=tmp_path)
    settings = lmcache_settings(config)
    known = set(LMCacheEngineConfig.from_defaults().to_dict())
    assert set(settings) <= known  # nothing LMCache would warn about and ignore
    theirs = _lmcache_reads(path)
    for key, value in {**settings, **expected}.items():
        assert getattr(theirs, key) == value, key
    assert (theirs.remote_url, theirs.max_local_cpu_size) == ("lm://127.0.0.1:10080", 3)


def test_the_same_config_gives_the_same_file(tmp_path: Path) -> None:
    config = SplitwiseConfig()
    first = write_lmcache_config(config, directory=tmp_path)
    assert write_lmcache_config(config, directory=tmp_path) == first
    other = write_lmcache_config(config.model_copy(update={"chunk_size": 16}), directory=tmp_path)
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_a_shared_memory_url_needs_the_stores_tcp_address() -> None:
    config = SplitwiseConfig(remote_url="shm://splitwise-10080")
    with pytest.raises(LMCacheConfigError, match="lm://HOST:PORT"):
        lmcache_settings(config)
    assert lmcache_settings(config, "lm://127.0.0.1:10080")["remote_url"] == "lm://127.0.0.1:10080"


def test_a_store_token_is_refused_since_lmcache_cannot_send_it() -> None:
    with pytest.raises(LMCacheConfigError, match="cannot carry a token"):
        lmcache_settings(SplitwiseConfig(store_auth_token="s3cret"))


def _kv_config(command: list[str]) -> dict | None:
    if "--kv-transfer-config" not in command:
        return None
    return json.loads(command[command.index("--kv-transfer-config") + 1])


def _spec(role: str, **fields) -> EngineSpec:
    return EngineSpec(model=Path("/models/m"), port=8100, role=role, device="cuda", **fields)


def test_the_engine_command_loads_lmcaches_connector_in_each_role() -> None:
    roles = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
    for role, kv_role in roles.items():
        kv = _kv_config(_spec(role, connector="lmcache", config_file=EXAMPLE).command())
        assert kv == {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": kv_role,
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {},
        }
    assert _kv_config(_spec("plain", connector="lmcache").command()) is None
    ours = _kv_config(_spec("prefill", config_file=EXAMPLE).command())
    assert ours is not None and ours["kv_connector"] == "SplitwiseConnector"  # still the default


def test_vllm_accepts_the_lmcache_kv_transfer_config() -> None:
    """What vLLM's own config class and connector factory make of it (imports vLLM: slow)."""
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    kv = _kv_config(_spec("decode", connector="lmcache").command())
    assert kv is not None
    parsed = KVTransferConfig(**kv)
    assert parsed.is_kv_consumer and not parsed.is_kv_producer
    assert parsed.kv_connector_module_path is None  # in-tree: found by name
    assert parsed.kv_connector in KVConnectorFactory._registry


def test_the_engine_environment_points_lmcache_at_the_generated_file(tmp_path: Path) -> None:
    store = "lm://127.0.0.1:10090"
    spec = _spec("prefill", connector="lmcache", config_file=EXAMPLE, store_url=store)
    env = spec.environment(base={})
    theirs = _lmcache_reads(Path(env[CONFIG_ENV_VAR]))
    assert (theirs.remote_url, theirs.chunk_size) == (store, 32)
    # No config file given: ours comes from LMCACHE_CONFIG_FILE, as the seed set it.
    env = _spec("decode", connector="lmcache").environment(base={CONFIG_ENV_VAR: str(EXAMPLE)})
    assert Path(env[CONFIG_ENV_VAR]) != EXAMPLE
    assert _lmcache_reads(Path(env[CONFIG_ENV_VAR])).remote_url == "lm://localhost:8100"
    assert CONFIG_ENV_VAR not in _spec("prefill", config_file=EXAMPLE).environment(base={})


@pytest.mark.skipif(detect_device() == "cuda", reason="checks the refusal on a host without CUDA")
def test_the_engine_subcommand_refuses_lmcache_on_the_cpu(capsys) -> None:
    assert cli.main(["engine", "--role", "prefill", "--connector", "lmcache"]) == 1
    assert "needs CUDA" in capsys.readouterr().err
