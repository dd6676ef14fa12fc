"""The local mooncake_master: loopback only, ready when it answers, stopped without leftovers,
and supervised like any launcher child. Also pins down the sockets a client opens, which
docs/mooncake.md lists."""

from __future__ import annotations

import os

import psutil
import pytest

from splitwise_local.serve.console import Console
from splitwise_local.serve.mooncake_master import MasterSpec, launcher_member, supervised_master
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.process import RUN_ENV
from splitwise_local.serve.supervisor import RestartPolicy, Supervisor
from splitwise_testing.mooncake_child import spawn_master
from tests.mooncake.conftest import OPTIONS, TIMEOUT_S


def listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_master_listens_on_loopback_only_and_stops_cleanly(tmp_path):
    log = tmp_path / "master.log"
    with spawn_master(log_path=log) as master:
        spec = master.spec
        assert listening(master.process.pid) == {
            ("127.0.0.1", spec.port),
            ("127.0.0.1", spec.metrics_port),
        }  # no HTTP metadata server, no metrics on every interface
        assert (
            master.url == f"mooncakestore://127.0.0.1:{spec.port}?metrics_port={spec.metrics_port}"
        )
    assert master.process.returncode is not None
    assert not psutil.pid_exists(master.process.pid) or (
        psutil.Process(master.process.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert "Master service started" in log.read_text()


def test_supervisor_waits_for_the_master_reports_its_death_and_leaves_nothing(tmp_path):
    supervisor = Supervisor(Console("error"), run=str(tmp_path), stop_grace=5)
    spec = MasterSpec.on_free_ports()
    env = {**os.environ, RUN_ENV: str(tmp_path)}
    child, ready = supervised_master(spec, env, tmp_path / "master.log", supervisor.console)
    try:
        supervisor.start_stage([(child, ready)], timeout=30)
        events = []
        supervisor.listen(events.append)
        supervisor.supervise(RestartPolicy(mode="never"))
        assert ready.ready() and not supervisor.failed.is_set()
        child.popen.kill()
        assert supervisor.failed.wait(10)
        assert [(event.child, event.up) for event in events] == [(child, False)]
        assert child.name in supervisor.failure
    finally:
        supervisor.stop_all()
    assert child.returncode is not None and not child.family()


def test_a_client_opens_two_listeners_on_every_interface(master):
    """Mooncake binds its transfer engine's handshake and data sockets to all interfaces
    whatever `local_hostname` says (docs/mooncake.md, Security); this notices a change."""
    from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend

    before = listening(os.getpid())
    client = MooncakeBackend(MasterAddress.parse(master.url), OPTIONS, TIMEOUT_S)
    try:
        opened = listening(os.getpid()) - before
    finally:
        client.close()
    assert len(opened) == 2
    assert {ip for ip, _ in opened} <= {"0.0.0.0", "::"}


@pytest.mark.parametrize("flag", ["--enable_http_metadata_server=false", "--rpc_address=10.1.2.3"])
def test_command_binds_the_chosen_host_and_keeps_the_metadata_server_off(flag):
    command = MasterSpec(50051, 9003, host="10.1.2.3").command()
    assert flag in command and "--metrics_host=10.1.2.3" in command


def test_launcher_member_points_the_engines_at_the_master(tmp_path):
    from splitwise_local.config import MooncakeOptions, SplitwiseConfig, load_config

    config = SplitwiseConfig(mooncake=MooncakeOptions(protocol="tcp", global_segment_size=1 << 20))
    port = free_port()
    (child, ready), config_file = launcher_member(
        config, port, tmp_path, dict(os.environ), Console("error")
    )
    engines = load_config(config_file, environ={})
    assert engines.remote_url.startswith(f"mooncakestore://127.0.0.1:{port}?metrics_port=")
    assert engines.mooncake == config.mooncake
    assert child.name == "mooncake master" and f"--rpc_port={port}" in child.command
    assert child.log_path == tmp_path / "mooncake_master.log" and not child.running
    assert not ready.ready()  # nothing started yet
