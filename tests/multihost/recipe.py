"""A multi-host recipe read from the docs and run as written, one network namespace per host.

A recipe is a YAML block (the engines' config) and a bash block of commands. Hosts are named
by address in the docs (10.0.0.1, .2, .3); here each address becomes a namespace's own, every
command runs in the namespace whose address it binds (`--host X`, `--rpc_address=X`), and a
command that binds none (the proxy) runs in the root namespace. The only other changes are the
proxy's port (8030 in the docs), which becomes a free one (the machine is shared), and the
proxy's `--route-detail`, whose header says how each request was routed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.netns import Host

DOC_HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
DOC_PROXY_PORT = "8030"
_BINDS = re.compile(r"(?:--host[ =]|--rpc_address=)(\d+\.\d+\.\d+\.\d+)")
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def section(text: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level (outside code)."""
    level = len(heading.split(" ", 1)[0])
    lines = text[text.index(heading + "\n") :].splitlines(keepends=True)
    fenced = False
    for index, line in enumerate(lines[1:], start=1):
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            return "".join(lines[:index])
    return "".join(lines)


def commands(script: str) -> list[str]:
    """The bash block's commands, continuation lines joined, comments dropped."""
    joined = script.replace("\\\n", " ")
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


@dataclass
class Running:
    """The recipe's processes; `stop()` ends the root namespace's (the Network ends the rest)."""

    proxy_url: str
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )


def run_commands(
    lines: list[str], hosts: dict[str, Host], workdir: Path, proxy_port: int
) -> Running:
    """Starts every command (addresses mapped to `hosts`, keyed by doc address) in `workdir`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python`, mooncake_*
    running = Running(f"http://127.0.0.1:{proxy_port}", workdir)
    for index, line in enumerate(lines):
        bound = _BINDS.search(line)
        host = hosts[bound.group(1)] if bound else None
        for doc_address, namespace in hosts.items():
            line = line.replace(doc_address, namespace.address)
        if host is None:  # the proxy: a free port, and the route header the test reads
            line = line.replace(f"--port {DOC_PROXY_PORT}", f"--port {proxy_port} --route-detail")
        argv = ["bash", "-c", line]
        with (workdir / f"{index}-{host.name if host else 'root'}.log").open("wb") as log:
            running.processes.append(
                subprocess.Popen(
                    host.command(argv) if host else argv,
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
    return running


def wait_http(url: str, running: Running, timeout: float) -> None:
    """Until GET `url` answers 200; fails with the logs if a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        gone = [p.args for p in running.processes if p.poll() is not None]
        if gone or time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered (exited: {gone})\n{running.log_tails()}")
        time.sleep(1)
