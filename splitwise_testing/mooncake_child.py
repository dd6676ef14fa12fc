"""A Mooncake master as a throwaway child process on free loopback ports, for tests and
benchmarks (the launcher supervises its own: `splitwise_local.serve.mooncake_master`)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from splitwise_local.serve.mooncake_master import DEFAULT_LEASE_MS, MasterSpec

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
PORT_ATTEMPTS = 3  # a free port found by binding can be taken before the master binds it


@dataclass
class SpawnedMaster:
    """A master started outside a launcher run (tests, benchmarks), with its log."""

    spec: MasterSpec
    process: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def url(self) -> str:
        """The `remote_url` for it."""
        return self.spec.url

    def log_tail(self, chars: int = 2000) -> str:
        """The end of its log, to explain a failure."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; always reaps."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def _start(spec: MasterSpec, log_path: Path | None) -> SpawnedMaster:
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log_path.open("ab")) if log_path else subprocess.DEVNULL
        process = subprocess.Popen(
            spec.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    master = SpawnedMaster(spec, process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError, httpx.HTTPError):
            if spec.ready():
                return master
        time.sleep(0.05)
    master.stop()
    raise RuntimeError(
        f"mooncake_master on {spec.host}:{spec.port} did not become ready "
        f"(exit code {process.returncode}): {master.log_tail()}"
    )


@contextlib.contextmanager
def spawn_master(
    log_path: Path | None = None, lease_ms: int = DEFAULT_LEASE_MS
) -> Iterator[SpawnedMaster]:
    """Runs a master on free loopback ports until the block ends (tests and benchmarks; the
    launcher uses `supervised_master`)."""
    for attempt in range(PORT_ATTEMPTS):
        try:
            master = _start(MasterSpec.on_free_ports(lease_ms=lease_ms), log_path)
            break
        except RuntimeError:
            if attempt == PORT_ATTEMPTS - 1:
                raise
    try:
        yield master
    finally:
        master.stop()
