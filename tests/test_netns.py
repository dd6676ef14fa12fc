"""The network-namespace helper: hosts reach each other and the root over the bridge, their
loopbacks stay private, a cut link partitions a host, and closing leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.netns import Host, Network, _ip, netns_problem

pytestmark = pytest.mark.skipif(netns_problem() is not None, reason=str(netns_problem()))

ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 9000))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(conn.recv(100))
    conn.close()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 9000), timeout=1.5) as conn:
        conn.sendall(b"ping")
        print(conn.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def serve(host: Host, address: str) -> subprocess.Popen:
    server = subprocess.Popen(
        host.command([sys.executable, "-c", ECHO_SERVER, address]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def ask(host: Host | None, address: str) -> str:
    argv = [sys.executable, "-c", CLIENT, address]
    done = subprocess.run(host.command(argv) if host else argv, capture_output=True, text=True)
    return done.stdout.strip()


def test_hosts_talk_over_the_bridge_and_nowhere_else():
    with Network() as net:
        store, engine = net.add("store"), net.add("engine")
        assert store.address != engine.address
        servers = [serve(store, store.address), serve(store, "127.0.0.1")]
        try:
            assert ask(engine, store.address) == "ping"
            assert ask(None, store.address) == "ping"  # the root namespace, via the bridge
            # The store's loopback is its own: the engine's 127.0.0.1 has nothing listening.
            assert ask(engine, "127.0.0.1") == "ConnectionRefusedError"
            store.cut()
            assert ask(engine, store.address) in ("TimeoutError", "OSError", "timeout")
            store.mend()
            deadline = time.monotonic() + 10
            while ask(engine, store.address) != "ping":
                assert time.monotonic() < deadline, "the link did not come back"
        finally:
            for server in servers:
                server.kill()
                server.wait()
        names = [host.name for host in net.hosts]
        bridge = net.bridge
        # A process still running inside a host is killed by close().
        sleeper = subprocess.Popen(engine.command([sys.executable, "-c", "input()"]),
                                   stdin=subprocess.PIPE)  # fmt: skip
    assert sleeper.wait(10) == -9
    listed = _ip("netns", "list")
    assert not [name for name in names if name in listed]
    assert bridge not in _ip("link")
