"""The YAML config: every key parsed, every bad value rejected with its key and file named."""

from pathlib import Path

import pytest

from splitwise_local.config import ConfigError, SplitwiseConfig, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_seeds_example_loads_verbatim():
    config = load_config(CONFIGS / "example.yaml", environ={})
    assert config.chunk_size == 32
    assert config.local_device == "cpu"
    assert config.remote_url == "lm://localhost:8100"
    assert config.remote_serde == "naive"
    assert config.pipelined_backend is False
    assert config.max_local_cpu_size == 5


def test_every_key_is_parsed(tmp_path):
    path = write(
        tmp_path,
        """
chunk_size: 64
local_device: cuda
remote_url: shm://arena
remote_serde: kivi
max_local_cpu_size: 1.5
pipelined_backend: true
serde_options: {bits: 2, group_size: 16}
store_auth_token: secret
mooncake: {protocol: rdma, device_name: mlx5_0, global_segment_size: 1024}
""",
    )
    config = load_config(path, environ={})
    assert (config.chunk_size, config.local_device, config.remote_url) == (
        64,
        "cuda",
        "shm://arena",
    )
    assert (config.remote_serde, config.pipelined_backend) == ("kivi", True)
    assert config.max_local_cpu_size == 1.5
    assert (config.serde_options.bits, config.serde_options.group_size) == (2, 16)
    assert config.store_auth_token == "secret"
    assert (config.mooncake.protocol, config.mooncake.device_name) == ("rdma", "mlx5_0")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("chunk_size: 0", "chunk_size"),
        ("chunk_size: many", "chunk_size"),
        ("local_device: tpu", "local_device"),
        ("remote_url: http://x:1", "remote_url"),
        ("remote_url: lm://", "remote_url"),
        ("remote_serde: zstd", "remote_serde"),
        ("max_local_cpu_size: -1", "max_local_cpu_size"),
        ("pipelined_backend: sometimes", "pipelined_backend"),
        ("serde_options: {bits: 3}", "serde_options.bits"),
        ("mooncake: {protocol: udp}", "mooncake.protocol"),
        ("chunk_sise: 32", "chunk_sise"),
    ],
)
def test_bad_values_are_rejected_naming_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert f"'{key}'" in str(error.value)
    assert str(path) in str(error.value)


def test_a_file_that_is_not_a_mapping_or_not_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_environment_overrides_the_file_and_names_itself_in_errors(tmp_path):
    path = write(tmp_path, "chunk_size: 64\n")
    assert load_config(path, environ={"SPLITWISE_CHUNK_SIZE": "32"}).chunk_size == 32
    assert load_config(path, environ={"SPLITWISE_PIPELINED_BACKEND": "true"}).pipelined_backend
    with pytest.raises(ConfigError, match="SPLITWISE_CHUNK_SIZE"):
        load_config(path, environ={"SPLITWISE_CHUNK_SIZE": "-3"})


def test_config_file_comes_from_the_environment_like_the_seed(tmp_path):
    path = write(tmp_path, "chunk_size: 48\n")
    assert load_config(environ={"LMCACHE_CONFIG_FILE": str(path)}).chunk_size == 48
    other = tmp_path / "other.yaml"
    other.write_text("chunk_size: 16\n")
    both = {"LMCACHE_CONFIG_FILE": str(path), "SPLITWISE_CONFIG_FILE": str(other)}
    assert load_config(environ=both).chunk_size == 16
    assert load_config(environ={}) == SplitwiseConfig()


def test_dump_and_load_round_trip(tmp_path):
    config = SplitwiseConfig(chunk_size=77, remote_serde="cachegen", store_auth_token="t")
    assert load_config(dump_config(config, tmp_path / "d.yaml"), environ={}) == config


def test_the_cpu_config_is_the_built_in_default():
    assert load_config(CONFIGS / "cpu.yaml", environ={}) == SplitwiseConfig()
