"""Helpers shared by the launcher tests: free ports, a launcher subprocess, leftover checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from splitwise_local.serve.process import tagged

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
READY = "ready: http://"


def free_ports(count: int) -> list[int]:
    """Distinct ports that are free now (held open together so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_run(count: int, avoid: Sequence[int] = ()) -> int:
    """The first of `count` consecutive ports that are all free now (and not in `avoid`)."""
    for _ in range(100):
        first = free_ports(1)[0]
        run = range(first, first + count)
        if first + count > 65535 or set(run) & set(avoid):
            continue
        sockets = [socket.socket() for _ in run]
        try:
            for sock, port in zip(sockets, run, strict=True):
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise AssertionError(f"no {count} consecutive free ports found")


@dataclass
class Ports:
    proxy: int
    prefill: int
    decode: int
    store: int

    @classmethod
    def for_engines(cls, prefill: int, decode: int) -> Ports:
        """Free ports for the proxy, the store and runs of `prefill` and `decode` engines."""
        proxy, store = free_ports(2)
        first_prefill = free_run(prefill, [proxy, store])
        taken = [proxy, store, *range(first_prefill, first_prefill + prefill)]
        return cls(proxy, first_prefill, free_run(decode, taken), store)

    def args(self) -> list[str]:
        return [
            "--port",
            str(self.proxy),
            "--prefill-port",
            str(self.prefill),
            "--decode-port",
            str(self.decode),
            "--store-port",
            str(self.store),
        ]


class Launch:
    """`python -m splitwise_local ...` as a user runs it, its stdout and stderr in files."""

    def __init__(self, args: list[str], run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.out_path = run_dir.parent / f"{run_dir.name}.stdout"
        self.err_path = run_dir.parent / f"{run_dir.name}.stderr"
        command = [sys.executable, "-m", "splitwise_local", *args, "--run-dir", str(run_dir)]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                command, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL
            )

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        """Waits until `text` is on stdout; fails with the output if the launcher exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.out:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"never saw {text!r} (exit code {self.popen.poll()}):\n"
                    f"stdout:\n{self.out}\nstderr:\n{self.err}"
                )
            time.sleep(0.2)

    def finish(self, sig: int | None = None, timeout: float = 60.0) -> int:
        """Sends `sig` (if any) and returns the exit code."""
        if sig is not None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)

    def child(self, marker: str) -> psutil.Process:
        """The launcher's direct child whose command line contains `marker`."""
        for process in psutil.Process(self.popen.pid).children():
            if marker in " ".join(process.cmdline()):
                return process
        raise AssertionError(f"no child of the launcher runs {marker!r}")

    def stop(self) -> None:
        """SIGTERM if still running; the caller then checks `leftovers`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(120)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def leftovers(run_dir: Path) -> list[str]:
    """Processes of that run still alive, as readable strings (empty when all are gone)."""
    deadline = time.monotonic() + 2.0  # a SIGKILLed process may need a moment to vanish
    while (found := tagged(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p.pid} {' '.join(p.cmdline())}" for p in found]


def sweep(run_dir: Path) -> None:
    """Kills whatever a failed test left of a run, so one failure does not starve the rest."""
    for process in tagged(str(run_dir)):
        process.kill()


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_env(tmp_path: Path, ports: Ports, modes: dict[int, str] | None = None) -> dict[str, str]:
    """The environment that makes the launcher's engines the fake engine of fake_vllm/."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_VLLM), env.get("PYTHONPATH")]))
    env["FAKE_ENGINE_EVENTS"] = str(tmp_path / "events.jsonl")
    env["FAKE_PROXY_PORT"] = str(ports.proxy)
    env["FAKE_STORE_PORT"] = str(ports.store)
    for port, mode in (modes or {}).items():
        env[f"FAKE_ENGINE_MODE_{port}"] = mode
    return env


def launch_fake(
    tmp_path: Path,
    ports: Ports,
    model: Path,
    *extra: str,
    modes: dict[int, str] | None = None,
    connector: str = "splitwise",
) -> Launch:
    """The launcher on the CPU with fake_vllm's engines (and the real store and proxy)."""
    args = ["--device", "cpu", "--model", str(model), "--connector", connector, *ports.args()]
    return Launch([*args, *extra], tmp_path / "run", fake_env(tmp_path, ports, modes))
