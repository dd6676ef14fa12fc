"""A launch without a configured store token makes one of its own: the store requires it on
both transports, so no other process on the host (or the network) may read, write or map the
KV, and only this user can read it from the run's config file."""

from __future__ import annotations

import signal
import stat

import pytest

from splitwise_local.config import load_config
from splitwise_local.store import AuthError, open_backend
from splitwise_local.store.client import ShmClient, StoreClient
from tests.serve.helpers import READY, launch_fake

pytestmark = pytest.mark.timeout(120)


def test_each_launch_has_its_own_store_token(tmp_path, ports, fake_model, launched):
    tokens = []
    for run in ("first", "second"):
        system = launch_fake(tmp_path / run, ports, fake_model)
        launched.append(system)
        system.wait_for(READY, 60)
        config_file = system.run_dir / "splitwise.yaml"
        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        config = load_config(config_file)
        assert config.store_auth_token and len(config.store_auth_token) >= 32
        tokens.append(config.store_auth_token)
        shm_name = config.remote_url.removeprefix("shm://")
        for stranger in (ShmClient(shm_name), StoreClient.tcp("127.0.0.1", ports.store)):
            with stranger, pytest.raises(AuthError):
                stranger.stats()
        with open_backend(config.remote_url, config) as engine:  # what the engines hold
            engine.put("k", b"v")
            assert bytes(engine.get("k")) == b"v"
        assert system.finish(signal.SIGTERM) == 0
    assert tokens[0] != tokens[1]


def test_a_configured_token_is_kept(tmp_path, ports, fake_model, launched):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("store_auth_token: chosen-by-the-operator\n")
    system = launch_fake(tmp_path, ports, fake_model, "--config", str(config_file))
    launched.append(system)
    system.wait_for(READY, 60)
    config = load_config(system.run_dir / "splitwise.yaml")
    assert config.store_auth_token == "chosen-by-the-operator"
    with StoreClient.tcp("127.0.0.1", ports.store, token="chosen-by-the-operator") as client:
        assert client.stats()["items"] == 0
    assert system.finish(signal.SIGTERM) == 0
