"""Separate "hosts" on one machine, for tests: Linux network namespaces on a private bridge.

Each `Host` is a network namespace with its own loopback and one veth link whose other end sits
on a bridge in the root namespace, so hosts reach each other and the root namespace (the bridge
holds `root_address`) over real TCP/IP, and nothing else reaches them. Addresses come from a
random 10.x.y.0/24 that no interface of this machine uses. A process started with
`host.command([...])` (`ip netns exec NAME ...`, which execs, so its pid is the command's own)
sees only its host's network: 127.0.0.1 there is its own loopback, and abstract Unix sockets
are per namespace too, so a same-host shortcut (our store's shm:// control socket) cannot work
across hosts by accident.

`host.cut()` / `host.mend()` take a host's link down and up again (a network partition);
`netns_problem()` says why namespaces cannot be used here (not root, no `ip`), for a skip.
Everything is removed on `close()`: processes still inside a namespace are killed first.

    with Network() as net:
        store, engine = net.add("store"), net.add("engine")
        server = subprocess.Popen(store.command(["python", "-m", "http.server", "--bind",
                                                 store.address, "8000"]))
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

IP = "ip"


def netns_problem() -> str | None:
    """Why this process cannot create network namespaces, or None when it can."""
    if shutil.which(IP) is None:
        return "the `ip` tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run([IP, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    """One network namespace: `name`, its address on the bridge, its veth's root-side end."""

    name: str
    address: str
    link: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's network namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def cut(self) -> None:
        """Takes this host off the network (its link goes down); its processes keep running."""
        _ip("link", "set", self.link, "down")

    def mend(self) -> None:
        _ip("link", "set", self.link, "up")

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.name).split()]


class Network:
    """A bridge in the root namespace and the hosts added to it; a context manager."""

    def __init__(self) -> None:
        problem = netns_problem()
        if problem is not None:
            raise RuntimeError(problem)
        self.tag = f"{random.randrange(16**5):05x}"  # interface names have at most 15 bytes
        self.subnet = self._free_subnet()
        self.bridge = f"swbr{self.tag}"
        self.root_address = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.root_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> str:
        """A 10.x.y prefix that no interface or route of this machine mentions."""
        used = _ip("-4", "addr") + _ip("-4", "route")
        for _ in range(100):
            candidate = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
            if f"{candidate}." not in used:
                return candidate
        raise RuntimeError("no free 10.x.y.0/24 subnet found")

    def add(self, role: str) -> Host:
        """A new host on the bridge, with loopback up; `role` only makes its name readable."""
        number = len(self.hosts) + 2
        host = Host(f"sw-{self.tag}-{role}", f"{self.subnet}.{number}", f"sw{self.tag}h{number}")
        inside = f"sw{self.tag}n{number}"
        _ip("netns", "add", host.name)
        self.hosts.append(host)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", host.name)
        _ip("link", "set", host.link, "master", self.bridge)
        _ip("link", "set", host.link, "up")
        for args in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{host.address}/24", "dev", inside),
            ("link", "set", inside, "up"),
        ):
            _ip("-n", host.name, *args)
        return host

    def close(self) -> None:
        """Kills what still runs in the hosts, then removes them and the bridge."""
        for host in self.hosts:
            with contextlib.suppress(RuntimeError):
                pids = host.pids()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while host.pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", host.name)
        self.hosts.clear()
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.bridge)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
