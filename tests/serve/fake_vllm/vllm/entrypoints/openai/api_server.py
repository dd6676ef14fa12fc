"""Fake engine: the proxy's fake OpenAI server, started the way the launcher starts vLLM.

Behaviour per engine port, from the environment (set by the tests):
- `FAKE_ENGINE_MODE_<port>`: `ok` (default); `crash` (raises, so exits 1, before listening);
  `hang` (never listens); `stubborn` (ignores SIGTERM, so only SIGKILL stops it); `flaky`
  (serves for 3 s, then exits 1, every time it is started); `sick` (after 3 s its /health
  answers 503 and its completions 503, as vLLM's do once its engine core has died).
  With `FAKE_ENGINE_TRIGGER` set, those 3 s start once that file exists: a test creates it once
  the system is ready, so how fast this machine starts one cannot race the fault.
- `FAKE_ENGINE_EVENTS`: a file; on SIGTERM the engine appends one JSON line saying whether the
  proxy (`FAKE_PROXY_PORT`) and the store (`FAKE_STORE_PORT`) still accept connections.
Like vLLM, it starts helper processes of its own; one of them leaves the process group
(setsid), so the launcher must find it by its run tag, not by its group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import uvicorn

from splitwise_testing.fake_engine import FakeBehaviour, FakeEngine


def accepts(port: str | None) -> bool:
    if not port:
        return False
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def record_sigterm(port: int) -> None:
    path = os.environ.get("FAKE_ENGINE_EVENTS")
    if not path:
        return
    event = {
        "port": port,
        "time": time.time(),
        "proxy_up": accepts(os.environ.get("FAKE_PROXY_PORT")),
        "store_up": accepts(os.environ.get("FAKE_STORE_PORT")),
    }
    with open(path, "a") as file:
        file.write(json.dumps(event) + "\n")


def start_helpers() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(3600)"]
    subprocess.Popen(sleeper)
    subprocess.Popen(sleeper, start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="fake-model")
    args, _ = parser.parse_known_args()
    mode = os.environ.get(f"FAKE_ENGINE_MODE_{args.port}", "ok")
    print(f"INFO fake engine on port {args.port}, mode {mode}", flush=True)
    start_helpers()
    if mode == "crash":
        print("ERROR fake engine: giving up", flush=True)
        raise RuntimeError("fake engine cannot load the model")
    engine = FakeEngine(FakeBehaviour(model=args.served_model_name))
    app = engine.app
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    stopping = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        record_sigterm(args.port)
        if mode != "stubborn":
            stopping.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    if mode != "hang":
        # In a thread, uvicorn leaves signal handling to this main thread.
        threading.Thread(target=server.run, daemon=True).start()
    if mode in ("sick", "flaky"):
        trigger = os.environ.get("FAKE_ENGINE_TRIGGER")
        while trigger and not os.path.exists(trigger) and not stopping.is_set():
            time.sleep(0.1)
        time.sleep(3.0)
    if mode == "sick":
        engine.behaviour.fail_status = 503
    if mode == "flaky":
        print("ERROR fake engine: lost its device", flush=True)
        raise RuntimeError("fake engine lost its device")
    while not stopping.wait(0.1):
        pass
    server.should_exit = True
    time.sleep(0.2)


if __name__ == "__main__":
    main()
