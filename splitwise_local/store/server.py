"""The store server: one arena, a TCP listener (`lm://`) and a Unix control socket (`shm://`).

`python -m splitwise_local store --port 10080 [--host 127.0.0.1] [--max-size-gb N] [--local-disk DIR
--max-disk-gb N] [--shm-name NAME] [--auth-token T] [--max-value-mb N] [--metrics-port N] [--config
FILE]` prints one line, `store ready on lm://HOST:PORT shm://NAME`, once both listeners accept
(then, with `--metrics-port`, `store metrics on http://HOST:PORT/metrics`: Prometheus's page, see
metrics.py), and exits cleanly on SIGTERM or SIGINT. Each connection gets a thread (there are few:
one per engine worker thread), so a slow or huge transfer on one never stalls another, and the
socket calls that move the bytes release the GIL. The first four bytes of a connection choose its
protocol, so the same port also speaks LMCache's own `lm://` (lmcache_protocol.py, chosen in
`_dispatch`). With a directory for the disk tier (`local_disk`), values evicted from DRAM are kept
there too, and a restarted store serves what reached it (tiers.py).

What a peer may cost is bounded (limits.py): connections are capped, those not yet
authenticated more tightly, and each frame must arrive whole within `frame_timeout`. Without
a token, only processes of the store's own user (or root) may use the shared-memory socket,
whose ATTACH hands out the whole arena read-write.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from splitwise_local.store import protocol as p
from splitwise_local.store.arena import PageAllocator, SharedArena
from splitwise_local.store.index import LMCACHE, OURS, PROTOCOLS, StoreIndex
from splitwise_local.store.limits import Admission, Lingering, Pass
from splitwise_local.store.lmcache_protocol import serve_lmcache, speaks_lmcache
from splitwise_local.store.metrics import MetricsServer
from splitwise_local.store.session import Session, SessionContext
from splitwise_local.store.tiers import DiskSettings, TieredIndex
from splitwise_local.store.transport import PeerClosed, control_address, recv_exact, remaining

log = logging.getLogger(__name__)

DEFAULT_PORT = 10080
DEFAULT_PAGE_KB = 64
DEFAULT_MAX_CONNECTIONS = 256  # an engine holds a few (one per worker thread), the proxy one
DEFAULT_MAX_UNAUTHENTICATED = 32
_PEERCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


@dataclass(frozen=True)
class ServerSettings:
    capacity: int  # bytes of values the store may hold
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    shm_name: str | None = None  # default: splitwise-<port>
    auth_token: str | None = None
    max_value: int | None = None  # default: the capacity
    page_size: int = DEFAULT_PAGE_KB * 1024
    prefault: bool = False
    frame_timeout: float = 30.0  # seconds a frame may take, first byte to last, either way
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # Prometheus's /metrics over HTTP; None: off, 0: any port
    disk: DiskSettings | None = None  # the disk tier below DRAM; None: DRAM only


class StoreServer:
    """Owns the arena, the listeners and the connection threads; `stop` releases all of it."""

    def __init__(self, settings: ServerSettings) -> None:
        if settings.page_size <= 0 or settings.capacity < settings.page_size:
            raise ValueError(
                f"capacity ({settings.capacity} B) must hold at least one page "
                f"({settings.page_size} B)"
            )
        self.settings = settings
        self._admission = Admission(
            settings.max_connections, settings.max_unauthenticated, settings.frame_timeout
        )
        num_pages = settings.capacity // settings.page_size
        with contextlib.ExitStack() as undo:  # on any failure, close what was opened
            family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
            self._tcp = socket.create_server((settings.host, settings.port), family=family)
            undo.callback(self._tcp.close)
            self.port = self._tcp.getsockname()[1]
            self.shm_name = settings.shm_name or f"splitwise-{self.port}"
            self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            undo.callback(self._unix.close)
            try:
                self._unix.bind(control_address(self.shm_name))
            except OSError as exc:
                raise OSError(
                    f"shm name {self.shm_name!r} is taken by another store: {exc}"
                ) from exc
            self._unix.listen()
            self.arena = SharedArena.create(
                f"splitwise-store-{self.shm_name}",
                num_pages * settings.page_size,
                settings.prefault,
            )
            undo.callback(self.arena.close)
            self.index = self._make_index(num_pages)
            undo.pop_all()
        self._context = SessionContext(
            index=self.index,
            arena=self.arena,
            arena_id=uuid.uuid4().hex,
            auth_token=settings.auth_token,
            frame_timeout=settings.frame_timeout,
            server_stats=self._server_stats,
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._accepted = 0
        self._open_by = dict.fromkeys(PROTOCOLS, 0)  # connections whose protocol is known
        self._accepted_by = dict.fromkeys(PROTOCOLS, 0)
        self.metrics: MetricsServer | None = None
        self._acceptor = threading.Thread(target=self._accept_loop, name="store-accept")

    def _make_index(self, num_pages: int) -> StoreIndex:
        settings = self.settings
        allocator = PageAllocator(num_pages, settings.page_size)
        max_value = settings.max_value or settings.capacity
        if settings.disk is None:
            return StoreIndex(allocator, max_value)
        return TieredIndex(allocator, max_value, self.arena, settings.disk)

    @property
    def tcp_url(self) -> str:
        host = self.settings.host
        return f"lm://[{host}]:{self.port}" if ":" in host else f"lm://{host}:{self.port}"

    @property
    def shm_url(self) -> str:
        return f"shm://{self.shm_name}"

    def start(self) -> StoreServer:
        if self.settings.metrics_port is not None:
            self.metrics = MetricsServer(
                self.stats, self.settings.metrics_host, self.settings.metrics_port
            )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Closes the listeners and every connection, waits for their threads, frees memory."""
        if self.metrics is not None:
            self.metrics.stop()
        if self._acceptor.is_alive():
            self._wake_w.send(b"x")
            self._acceptor.join()
        with self._lock:
            connections = dict(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in connections.values():
            thread.join(timeout=5)
        for sock in (self._tcp, self._unix, self._wake_r, self._wake_w):
            sock.close()
        self.index.close()
        try:
            self.arena.close()
        except BufferError:
            log.warning("store: arena still referenced by a stuck connection; freed at exit")

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """What STATS answers: the index's numbers and the server's."""
        return {**self.index.stats(), **self._server_stats()}

    def _server_stats(self) -> dict[str, Any]:
        with self._lock:
            connections = len(self._connections)
            open_by, accepted_by = dict(self._open_by), dict(self._accepted_by)
        return {
            "connections": connections,
            "connections_unauthenticated": self._admission.unauthenticated,
            "refused_connections": self._admission.refused,
            "accepted": self._accepted,
            "connections_by_protocol": open_by,
            "accepted_by_protocol": accepted_by,
            "arena_resident_bytes": self.arena.resident_bytes(),
            "pid": os.getpid(),
        }

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._tcp, selectors.EVENT_READ, False)
            selector.register(self._unix, selectors.EVENT_READ, True)
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            lingering = Lingering(selector)
            try:
                while True:
                    for key, _ in selector.select(lingering.timeout()):
                        if key.data is None:
                            return
                        if key.data is lingering:
                            lingering.drain(key.fileobj)
                        else:
                            self._accept(key.fileobj, key.data, lingering)  # type: ignore[arg-type]
            finally:
                lingering.close_all()

    def _accept(self, listener: socket.socket, unix: bool, lingering: Lingering) -> None:
        try:
            sock, addr = listener.accept()
        except OSError as exc:  # e.g. out of file descriptors: keep serving the others
            log.warning("store: accept failed: %s", exc)
            return
        peer = "unix client" if unix else f"{addr[0]}:{addr[1]}"
        if unix and not self.settings.auth_token and not self._same_user(sock):
            log.warning("store: refusing %s of another user: this store has no token", peer)
            message = b"this store has no token: only its own user may use shared memory"
            lingering.add(sock, p.frame(p.Status.AUTH_FAILED, 0, message))
            return
        ticket = self._admission.admit()
        if isinstance(ticket, str):
            log.warning("store: refusing %s: %s", peer, ticket)
            lingering.add(sock, p.frame(p.Status.BUSY, 0, ticket.encode()))
            return
        if not unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(
            target=self._serve, args=(sock, peer, unix, ticket), name=f"store {peer}", daemon=True
        )
        with self._lock:
            self._connections[sock] = thread
            self._accepted += 1
        thread.start()

    @staticmethod
    def _same_user(sock: socket.socket) -> bool:
        """Whether a Unix-socket peer runs as this process's user, or as root."""
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        return uid in (os.getuid(), 0)

    def _serve(self, sock: socket.socket, peer: str, unix: bool, ticket: Pass) -> None:
        try:
            self._dispatch(sock, peer, unix, ticket)
        finally:
            ticket.close()
            with self._lock:
                self._connections.pop(sock, None)
            sock.close()

    def _dispatch(self, sock: socket.socket, peer: str, unix: bool, ticket: Pass) -> None:
        """Chooses the protocol by the connection's first four bytes."""
        try:
            sock.settimeout(remaining(ticket.auth_deadline))
            first = bytes(recv_exact(sock, len(p.MAGIC), first=True))
        except TimeoutError:
            log.warning("store: dropping %s: it sent nothing within the frame deadline", peer)
            return
        except (PeerClosed, OSError):
            return
        if first == p.MAGIC:
            with self._counted(OURS):
                Session(sock, self._context, peer, unix, ticket).serve(first)
        elif speaks_lmcache(first):
            with self._counted(LMCACHE):
                serve_lmcache(self._context, sock, first, peer, ticket)
        else:
            log.warning("store: %s speaks an unknown protocol (first bytes %r)", peer, first)

    @contextlib.contextmanager
    def _counted(self, protocol: str) -> Iterator[None]:
        """Counts a connection under its protocol while it is served."""
        with self._lock:
            self._open_by[protocol] += 1
            self._accepted_by[protocol] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open_by[protocol] -= 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any)")
    parser.add_argument("--max-size-gb", type=float, help="capacity (default: max_local_cpu_size)")
    parser.add_argument(
        "--local-disk", help="directory of the disk tier below DRAM (default: local_disk; none)"
    )
    parser.add_argument(
        "--max-disk-gb", type=float, help="the disk tier's capacity (default: max_local_disk_size)"
    )
    parser.add_argument("--shm-name", help="name for shm:// clients (default splitwise-PORT)")
    parser.add_argument("--auth-token", help="shared secret (default: store_auth_token)")
    parser.add_argument("--max-value-mb", type=float, help="largest value (default: capacity)")
    parser.add_argument("--page-kb", type=int, default=DEFAULT_PAGE_KB, help="allocation unit")
    parser.add_argument(
        "--prefault", action="store_true", help="reserve the whole capacity at start"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus's /metrics on this port (0: any)"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="the /metrics address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--frame-timeout",
        type=float,
        default=30.0,
        help="seconds a frame may take, first byte to last; a slower one drops its connection",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections held at once; more are refused (default %(default)s)",
    )
    parser.add_argument(
        "--max-unauthenticated",
        type=int,
        default=DEFAULT_MAX_UNAUTHENTICATED,
        help="connections not yet past HELLO at once; more are refused (default %(default)s)",
    )
    parser.add_argument("--config", help="YAML config file")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    # Late: config.py needs pydantic, which a GPU machine running the GPU check (it starts a
    # StoreServer from its settings, without the command line) does not have.
    from splitwise_local.config import load_config

    config = load_config(args.config)
    size_gb = args.max_size_gb if args.max_size_gb is not None else config.max_local_cpu_size
    if size_gb <= 0 or (args.max_value_mb is not None and args.max_value_mb <= 0):
        raise ValueError("--max-size-gb and --max-value-mb must be positive")
    if args.frame_timeout <= 0:
        raise ValueError("--frame-timeout must be positive")
    disk = args.local_disk or config.local_disk
    disk_gb = args.max_disk_gb if args.max_disk_gb is not None else config.max_local_disk_size
    if disk and disk_gb <= 0:
        raise ValueError("the disk tier needs a positive --max-disk-gb (max_local_disk_size)")
    return ServerSettings(
        capacity=int(size_gb * 1024**3),
        host=args.host,
        port=args.port,
        shm_name=args.shm_name,
        auth_token=args.auth_token or config.store_auth_token,
        max_value=int(args.max_value_mb * 1024**2) if args.max_value_mb else None,
        page_size=args.page_kb * 1024,
        prefault=args.prefault,
        frame_timeout=args.frame_timeout,
        max_connections=args.max_connections,
        max_unauthenticated=args.max_unauthenticated,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        disk=DiskSettings(disk, int(disk_gb * 1024**3)) if disk else None,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = StoreServer(settings_from_args(args))
    except (OSError, ValueError) as exc:
        print(f"store: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        server.start()
    except OSError as exc:  # the metrics port
        server.stop()
        where = f"{args.metrics_host}:{args.metrics_port}"
        print(f"store: cannot serve /metrics on {where}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        if not server.settings.auth_token:
            log.warning(
                "store: no auth token: any client that reaches %s may read and write the KV "
                "(shared memory is limited to this user); set store_auth_token",
                server.tcp_url,
            )
        print(f"store ready on {server.tcp_url} {server.shm_url}", flush=True)
        if server.metrics is not None:
            print(f"store metrics on {server.metrics.url}", flush=True)
        stopping.wait()
        log.info("store: shutting down")
    finally:
        server.stop()
    return 0
