"""Ports that are free on this host now, for the children that the launcher, the benchmarks and
the tests start on ports of their own choosing (a port can still be taken before it is bound)."""

from __future__ import annotations

import socket


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports free on `host` now (held open together so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` now."""
    return free_ports(1, host)[0]
