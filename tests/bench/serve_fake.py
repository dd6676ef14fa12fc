"""A small vLLM-shaped streaming completions server for the load generator's tests.

Unlike the proxy's fake engine (which counts words and answers instantly), this one counts
prompt tokens with the real tokenizer (a prompt of token ids is its length) and streams what
vLLM streams for `/v1/completions`: `token_ids` per chunk (sometimes two tokens in one chunk,
as vLLM does when a client lags), a final usage chunk, `max_model_len` in `/v1/models`, and a
Prometheus `/metrics` with a transfer-like counter and histogram. A request with `stream`
false (the proxy's prefill copy) gets the whole answer as one JSON body. It keeps every request
body in arrival order. Knobs let a test break exactly one thing (usage off by one, failing
requests) to see the load generator notice, or hold every answer until the test lets go.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-vllm"
MAX_MODEL_LEN = 2048
KV_BYTES_PER_PROMPT_TOKEN = 100


@dataclass
class Knobs:
    token_interval_s: float = 0.002
    coalesce_every: int = 0  # every Nth chunk carries two tokens (0: never)
    usage_error: int = 0  # added to the completion_tokens the usage chunk reports
    fail_every: int = 0  # every Nth request answers 500 (0: never)
    hold: threading.Event | None = None  # when given, answers wait until it is set


class FakeVLLM:
    def __init__(self, count_tokens: Callable[[str], int], knobs: Knobs) -> None:
        self.count_tokens = count_tokens
        self.knobs = knobs
        self.requests: list[dict] = []
        self.registry = CollectorRegistry()
        self.kv_bytes = Counter(
            "splitwise_kv_bytes_loaded", "KV bytes loaded", registry=self.registry
        )
        self.kv_seconds = Histogram(
            "splitwise_kv_load_seconds", "KV load time", registry=self.registry
        )
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models),
                Route("/health", self.health),
                Route("/v1/completions", self.complete, methods=["POST"]),
                Route("/metrics", self.metrics),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"data": [{"id": MODEL, "max_model_len": MAX_MODEL_LEN}]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain")

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        while self.knobs.hold is not None and not self.knobs.hold.is_set():
            await asyncio.sleep(0.01)
        if self.knobs.fail_every and len(self.requests) % self.knobs.fail_every == 0:
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=500)
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        prompt_tokens = self.prompt_tokens(body["prompt"])
        self.kv_bytes.inc(prompt_tokens * KV_BYTES_PER_PROMPT_TOKEN)
        self.kv_seconds.observe(0.25)
        if not body.get("stream"):
            return JSONResponse(self.whole(prompt_tokens, body["max_tokens"]))
        return StreamingResponse(
            self.stream(prompt_tokens, body["max_tokens"]), media_type="text/event-stream"
        )

    def prompt_tokens(self, prompt: str | list[int]) -> int:
        if isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return len(prompt)
        return self.count_tokens(prompt)

    def whole(self, prompt_tokens: int, max_tokens: int) -> dict:
        ids = list(range(max_tokens))
        choice = {
            "index": 0,
            "text": " tok" * max_tokens,
            "token_ids": ids,
            "finish_reason": "length",
        }
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        return {"choices": [choice], "usage": usage}

    async def stream(self, prompt_tokens: int, max_tokens: int) -> AsyncIterator[str]:
        sent, chunk_no = 0, 0
        while sent < max_tokens:
            chunk_no += 1
            coalesce = self.knobs.coalesce_every and chunk_no % self.knobs.coalesce_every == 0
            ids = list(range(sent, min(sent + (2 if coalesce else 1), max_tokens)))
            sent += len(ids)
            done = sent == max_tokens
            choice = {
                "index": 0,
                "text": " tok" * len(ids),
                "token_ids": ids,
                "finish_reason": "length" if done else None,
            }
            await asyncio.sleep(self.knobs.token_interval_s)
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sent + self.knobs.usage_error,
            "total_tokens": prompt_tokens + sent + self.knobs.usage_error,
        }
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


@contextmanager
def serve_fake(tokenizer, knobs: Knobs | None = None) -> Iterator[tuple[str, FakeVLLM]]:
    """Runs a FakeVLLM on a free 127.0.0.1 port in a thread; yields its URL and the fake."""
    fake = FakeVLLM(lambda text: len(tokenizer(text)["input_ids"]), knobs or Knobs())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            if not thread.is_alive():
                raise RuntimeError("fake vLLM server did not start")
        yield f"http://127.0.0.1:{port}", fake
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main() -> None:
    """`python serve_fake.py --port P`: one fake in the foreground (the experiment script's
    test starts it where the script would start a real engine or the launcher)."""
    import argparse

    from tokenizers import Tokenizer  # starts in a blink, unlike transformers

    from splitwise_local.models.checkpoint import prepare_default_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--say-ready", action="store_true", help="print the launcher's ready line")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(prepare_default_model() / "tokenizer.json"))
    fake = FakeVLLM(lambda text: len(tokenizer.encode(text).ids), Knobs())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    if args.say_ready:
        print(f"[launcher] ready: http://127.0.0.1:{args.port}", flush=True)
    config = uvicorn.Config(fake.app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
