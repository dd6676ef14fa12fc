"""The KV store as a throwaway child process, for benchmarks and tests.

The launcher supervises its own store (`launcher.store_member`); this is the bare version: start
`python -m splitwise_local store --port 0`, read its ready line, stop it on exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import NamedTuple

from splitwise_local.serve.process import terminate


class SpawnedStore(NamedTuple):
    """A store process started by `spawn`, with the URLs its clients use."""

    process: subprocess.Popen
    tcp_url: str
    shm_url: str
    token: str | None = None  # what its clients must present


@contextlib.contextmanager
def spawn(
    *args: str, env: dict[str, str] | None = None, token: str | None = None
) -> Iterator[SpawnedStore]:
    """Runs `python -m splitwise_local store --port 0 ARGS` as a child until its ready line;
    stops it (SIGTERM, then SIGKILL) on exit. With `token` the store requires it (handed over
    in the environment, not on the command line). For benchmarks and tests; the launcher has
    its own supervised children."""
    command = [sys.executable, "-m", "splitwise_local", "store", "--port", "0", *args]
    if token is not None:
        env = {**(os.environ if env is None else env), "SPLITWISE_STORE_AUTH_TOKEN": token}
    with run_until_ready(command, env, "store") as (process, tcp_url, shm_url):
        yield SpawnedStore(process, tcp_url, shm_url, token)


@contextlib.contextmanager
def run_until_ready(
    command: list[str], env: dict[str, str] | None, what: str
) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """Starts a store `command` and reads its ready line (`store ready on TCP_URL SHM_URL`);
    yields the process and both URLs; stops it on exit. Raises, with its stderr, if the line
    is not the first it prints."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("store ready on "):
            process.kill()
            error = process.stderr.read() if process.stderr else ""
            raise RuntimeError(f"{what} did not start: {line.strip()} {error.strip()}")
        _, _, _, tcp_url, shm_url = line.split()
        yield process, tcp_url, shm_url
    finally:
        terminate(process)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
