"""Fake engines and a fake launcher for the experiment's short mode: the orchestration, the
files and the report's arithmetic are real; the engines and the store are not.

`engine --role plain --port P` serves one fake vLLM engine with a prefix cache; `serve` (the
launcher) serves the proxy's port and fake prefill and decode engines' /metrics on theirs, with
a store. The prefix cache keeps every prefix of the prompts it saw in BLOCK-token blocks, the
store in blocks of the config's `chunk_size`; neither evicts. They count where each prompt
token came from as vLLM's `vllm:prompt_tokens_by_source` does, and the tokens saved as the
connector's `splitwise:saved_tokens` does. `serve --admission` refuses (429, Retry-After) a
request that arrives while ADMITTED requests are in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
import yaml
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # serve_fake.py, beside this folder
from serve_fake import FakeVLLM, Knobs

BLOCK = 16  # the fake engine's prefix-cache block (vLLM's is 128 on the CPU)
ADMITTED = 1
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


class Cache:
    """Every prefix seen, in blocks of `size` tokens (a partial last block is its own entry)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held: set[tuple[int, ...]] = set()

    def lookup_and_add(self, ids: list[int]) -> int:
        """Leading tokens held before this prompt; then holds all of its prefixes."""
        ends = [*range(self.size, len(ids), self.size), len(ids)]
        hit = 0
        for end in ends:
            if tuple(ids[:end]) not in self.held:
                break
            hit = end
        self.held.update(tuple(ids[:end]) for end in ends)
        return hit


class FakeEngine(FakeVLLM):
    """A fake vLLM server counting prompt tokens by source against its prefix cache; as a whole
    launcher also a store (the prefill engine saves what it lacks, the decode engine loads all
    but the last token), refusing like the proxy's admission control when asked to."""

    def __init__(self, encode, store: Cache | None, admission: bool, knobs: Knobs) -> None:
        super().__init__(lambda text: len(encode(text)), knobs)
        self.encode = encode
        self.cache = Cache(BLOCK)
        self.store = store
        self.admission = admission
        self.in_flight = 0
        # A plain engine shows its counters on its own /metrics; a launcher on its engines'.
        self.engine = self.registry if store is None else CollectorRegistry()
        self.decode = CollectorRegistry()
        self.by_source = Counter(
            "vllm:prompt_tokens_by_source", "prompt tokens", ["source"], registry=self.engine
        )
        self.loaded = Counter(
            "vllm:prompt_tokens_by_source", "prompt tokens", ["source"], registry=self.decode
        )
        self.saved = Counter("splitwise:saved_tokens", "saved", registry=self.engine)
        for source in SOURCES:
            self.by_source.labels(source).inc(0)
            self.loaded.labels(source).inc(0)

    async def complete(self, request: Request) -> Response:
        if self.admission and self.in_flight >= ADMITTED:
            error = {"message": "busy", "type": "tokens", "code": "rate_limit_exceeded"}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        body = await request.json()
        prompt = body["prompt"]
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt)
        hit = self.cache.lookup_and_add(ids)
        self.by_source.labels("local_compute").inc(len(ids) - hit)
        self.by_source.labels("local_cache_hit").inc(hit)
        if self.store is not None:
            self.saved.inc(len(ids) - self.store.lookup_and_add(ids))
            self.loaded.labels("external_kv_transfer").inc(len(ids) - 1)
            self.loaded.labels("local_compute").inc(1)
        response = await super().complete(_Replayed(request, body))
        if isinstance(response, StreamingResponse):  # in flight until its last chunk is sent
            response.body_iterator = self._counted(response.body_iterator)
        return response

    async def _counted(self, chunks: AsyncIterator) -> AsyncIterator:
        self.in_flight += 1
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.in_flight -= 1


class _Replayed:
    """The request again for the parent's handler, its body already read."""

    def __init__(self, request: Request, body: dict) -> None:
        self._request, self._body = request, body

    async def json(self) -> dict:
        return self._body


def metrics_only(registry: CollectorRegistry) -> Starlette:
    """An engine's /metrics and /health, nothing else."""

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(routes=[Route("/metrics", metrics), Route("/health", health)])


def listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def serve(apps: list[tuple[Starlette, socket.socket]]) -> None:
    config = {"log_level": "warning", "lifespan": "off"}
    servers = [(uvicorn.Server(uvicorn.Config(app, **config)), sock) for app, sock in apps]
    await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))


def main() -> None:
    from tokenizers import Tokenizer  # starts in a blink, unlike transformers

    from splitwise_local.models.checkpoint import prepare_default_model

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["engine", "serve"])
    for flag in ("--port", "--prefill-port", "--decode-port"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--config")
    parser.add_argument("--admission", action="store_true")
    args, _ = parser.parse_known_args()
    tokenizer = Tokenizer.from_file(str(prepare_default_model() / "tokenizer.json"))
    store = None
    if args.command == "serve":
        store = Cache(yaml.safe_load(Path(args.config).read_text())["chunk_size"])
    knobs = Knobs(token_interval_s=0.02 if args.admission else 0.002)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    fake = FakeEngine(encode, store, args.admission, knobs)
    apps = [(fake.app, listen(args.port))]
    if store is not None:
        apps.append((metrics_only(fake.engine), listen(args.prefill_port)))
        apps.append((metrics_only(fake.decode), listen(args.decode_port)))
        print(f"[launcher] ready: http://127.0.0.1:{args.port}", flush=True)
    asyncio.run(serve(apps))


if __name__ == "__main__":
    main()
