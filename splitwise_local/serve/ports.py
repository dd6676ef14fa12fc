"""Ports on this host: free ones for the children that the benchmarks and the tests start on
ports of their own choosing (a port can still be taken before it is bound), and the check that
the ports a launch asks for can be bound."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import NamedTuple


class PortClaim(NamedTuple):
    """A port one component will listen on, and the option that chose it (for the message)."""

    component: str
    host: str
    port: int
    option: str


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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not bind (host, port) now (same options as uvicorn and vLLM), or None."""
    with socket.socket(_family(host)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
    return None


def port_problems(claims: Iterable[PortClaim]) -> list[str]:
    """Every clash between the claims and every claimed port that cannot be bound now."""
    problems = []
    owners: dict[int, str] = {}
    for component, host, port, option in claims:
        if port in owners:
            problems.append(f"{component} and {owners[port]} both use port {port} ({option})")
        elif (problem := bind_problem(host, port)) is not None:
            problems.append(f"port {port} for the {component} {problem} (choose another: {option})")
        owners.setdefault(port, component)
    return problems


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), bound now so no other process can take the port."""
    return socket.create_server((host, port), family=_family(host))
