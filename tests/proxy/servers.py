"""Serving ASGI apps for tests: uvicorn in background threads on free 127.0.0.1 ports."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp


class Servers:
    """uvicorn servers in threads on free ports, all stopped together (each takes ~0.1 s)."""

    def __init__(self) -> None:
        self._running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def serve(self, app: ASGIApp) -> str:
        """Serves `app` on a free 127.0.0.1 port; returns its base URL once it accepts."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        self._running.append((server, thread, sock))
        deadline = time.monotonic() + 60  # a routing proxy loads its tokenizer first
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.005)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        for server, _, _ in self._running:
            server.should_exit = True
        for _, thread, sock in self._running:
            thread.join(10)
            sock.close()
