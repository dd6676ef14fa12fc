"""Exposure check: every socket a running system listens on is bound to 127.0.0.1 by default.

Lists the TCP and UDP listeners of every process of the run (the launcher, which serves the
proxy, and each component with whatever it spawned, found by the run's tag) and expects each on
the loopback address. The only documented exception, Mooncake's own listeners, belongs to
`--store mooncake` (docs/mooncake.md), which this launch does not use.
"""

from __future__ import annotations

import socket

import psutil
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]
LOOPBACK = {"127.0.0.1", "::1"}


def listeners(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket and bound UDP socket."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids or not conn.laddr:
            continue
        listening = conn.status == psutil.CONN_LISTEN
        if listening or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
            name = psutil.Process(conn.pid).name()
            found.append((conn.pid, name, conn.laddr.ip, conn.laddr.port))
    return found


def test_everything_listens_on_loopback_only(system):
    pids = {system.launch.popen.pid, *(p.pid for p in system.launch.processes())}
    found = listeners(pids)
    ports = {port for *_, port in found}
    # The proxy, both engines and the store's TCP port are among them...
    assert {system.ports[name] for name in system.ports} <= ports, found
    # ... and nothing, engines' internals included, listens beyond this host.
    exposed = [entry for entry in found if entry[2] not in LOOPBACK]
    assert exposed == [], exposed
