"""A real store whose writes answer late: what a slow store costs the engines, measured and tested.

`hold_writes(server, hold)` makes every write to `server` (a PUT over TCP, the COMMIT after a
shared-memory write) call `hold()` on its connection's thread before the value becomes visible,
outside the index's lock: lookups, reads and other connections' writes go on meanwhile, as on a
store whose disk or network is slow for writes only. The store is otherwise the real one.

As a process, `python -m splitwise_testing.slow_store --delay-file F [store options]` holds
each write for the seconds written in F (none while F is missing, empty or 0), so a test or a
benchmark makes a running store slow and quick again by writing one number.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from splitwise_local.store.server import StoreServer, add_arguments, settings_from_args
from splitwise_testing.store_child import SpawnedStore, run_until_ready


def hold_writes(server: StoreServer, hold: Callable[[], object]) -> None:
    """Every write to `server` calls `hold()` first, on the writer's connection thread."""
    commit = server.index.commit

    def held(*args, **kwargs):
        hold()
        return commit(*args, **kwargs)

    server.index.commit = held  # type: ignore[method-assign]


def delay_from(path: Path) -> Callable[[], None]:
    """Sleeps for the seconds written in `path` (0 while it is missing or unreadable)."""

    def hold() -> None:
        try:
            seconds = float(path.read_text().strip() or 0)
        except (OSError, ValueError):
            seconds = 0.0
        if seconds > 0:
            time.sleep(seconds)

    return hold


@contextlib.contextmanager
def slow_store(delay_file: Path, *args: str) -> Iterator[SpawnedStore]:
    """This module as a child process until its ready line; stopped on exit."""
    command = [
        sys.executable,
        "-m",
        __name__,
        "--port",
        "0",
        "--delay-file",
        str(delay_file),
        *args,
    ]
    with run_until_ready(command, None, "slow store") as (process, tcp_url, shm_url):
        yield SpawnedStore(process, tcp_url, shm_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--delay-file", type=Path, required=True, help="seconds to hold writes")
    args = parser.parse_args(argv)
    server = StoreServer(settings_from_args(args))
    hold_writes(server, delay_from(args.delay_file))
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    try:
        print(f"store ready on {server.tcp_url} {server.shm_url}", flush=True)
        stopping.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
