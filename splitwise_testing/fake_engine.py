"""A tiny OpenAI-compatible server that answers instantly, for proxy tests and benchmarks.

It speaks just enough of vLLM's API (chat and text completions, whole or streamed, `/v1/models`,
`/health`, `/metrics` with vLLM's gauges of the requests it runs, vLLM-shaped 400/404 errors,
a NixlConnector-shaped `kv_transfer_params` in a prefill answer asked `do_remote_decode`,
and like vLLM a stream refused only after its 200: too many `logprobs` end it with an error
event) for the proxy to be load- and fault-tested without a model. It records what it was asked
and whether a stream ran to the end or was cut off, and can be told to fail, stall (a while, or
until released), or pace its tokens. Each streamed chunk carries `sent_at` (wall clock) so a
client can measure how long the bytes took to reach it.

`python -m splitwise_testing.fake_engine --port 8010` runs one in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

POLL_S = 0.01
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


@dataclass
class FakeBehaviour:
    """How the fake answers; tests change fields between requests."""

    name: str = "fake"
    model: str = "fake-model"
    tokens: int = 8
    token_interval_s: float = 0.0
    delay_s: float = 0.0
    hold: threading.Event | None = None  # when given, requests wait until it is set
    fail_status: int | None = None
    max_prompt_words: int | None = None
    set_cookie: bool = False
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name -> path, in /v1/models


@dataclass
class FakeRecord:
    """What the fake saw: request bodies and headers, and how its streams ended."""

    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    streams_completed: int = 0
    streams_cut: int = 0
    whole_cut: int = 0
    cut: threading.Event = field(default_factory=threading.Event)
    running: int = 0  # requests being answered now (a stream until its last byte)


def _error_body(
    status: int, message: str, error_type: str, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def _error(status: int, message: str, error_type: str, param: str | None = None) -> Response:
    return JSONResponse(_error_body(status, message, error_type, param), status)


def _prompt_words(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    return len(str(body.get("prompt", "")).split())


class FakeEngine:
    """The fake server's state and routes; `app` is the Starlette app to serve."""

    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeBehaviour()
        self.record = FakeRecord()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/v1/completions", self._complete, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
            ]
        )

    async def _health(self, request: Request) -> Response:
        return Response(status_code=self.behaviour.fail_status or 200)

    async def _models(self, request: Request) -> Response:
        """The base model, then each LoRA adapter as vLLM lists it (`root`: its path)."""
        behaviour = self.behaviour
        cards = [{"id": behaviour.model, "object": "model", "owned_by": behaviour.name}]
        cards += [
            {"id": name, "object": "model", "root": path, "parent": behaviour.model}
            for name, path in behaviour.adapters.items()
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def _metrics(self, request: Request) -> Response:
        """vLLM's gauges of the requests it runs and queues (this fake queues none)."""
        labels = f'engine="0",model_name="{self.behaviour.model}"'
        page = (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self.record.running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        )
        return Response(page, media_type="text/plain; version=0.0.4")

    async def _complete(self, request: Request) -> Response:
        self.record.running += 1
        try:
            response = await self._answer(request)
        except BaseException:
            self.record.running -= 1
            raise
        if isinstance(response, StreamingResponse):  # it runs until its last chunk is sent
            response.body_iterator = self._counted(response.body_iterator)
        else:
            self.record.running -= 1
        if self.behaviour.set_cookie:
            response.set_cookie("engine_session", "secret")
        return response

    async def _counted(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self.record.running -= 1

    async def _answer(self, request: Request) -> Response:
        behaviour = self.behaviour
        body = await request.json()
        self.record.requests.append((request.url.path, body, dict(request.headers)))
        if behaviour.delay_s and await self._cut_short(request, behaviour.delay_s):
            return Response(status_code=499)
        if behaviour.hold is not None and await self._held(request, behaviour.hold):
            return Response(status_code=499)
        if behaviour.fail_status:
            return _error(behaviour.fail_status, "fake engine failure", "InternalServerError")
        if body.get("model") != behaviour.model and body.get("model") not in behaviour.adapters:
            message = f"The model `{body.get('model')}` does not exist."
            return _error(404, message, "NotFoundError", "model")
        words = _prompt_words(body)
        if behaviour.max_prompt_words is not None and words > behaviour.max_prompt_words:
            message = (
                f"This model's maximum context length is {behaviour.max_prompt_words} tokens. "
                f"However, your request has {words} input tokens."
            )
            return _error(400, message, "BadRequestError")
        logprobs = body.get("logprobs")
        if type(logprobs) is int and logprobs > MAX_LOGPROBS:
            message = f"Requested sample logprobs of {logprobs}, which is greater than max allowed"
            if body.get("stream"):  # vLLM validates once the stream has begun
                refusal = _error_body(400, message, "BadRequestError", "logprobs")
                events = [_event(refusal), "data: [DONE]\n\n"]
                return StreamingResponse(iter(events), media_type="text/event-stream")
            return _error(400, message, "BadRequestError", "logprobs")
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or behaviour.tokens
        count = min(int(limit), behaviour.tokens)
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            chunks = self._stream(chat, count, words if usage else None)
            return StreamingResponse(chunks, media_type="text/event-stream")
        if await self._cut_short(request, count * behaviour.token_interval_s):
            return Response(status_code=499)
        text = "".join(self._token(i) for i in range(count))
        choice = {"index": 0, "finish_reason": "length"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        answer = self._envelope(chat, stream=False, choice=choice)
        answer["usage"] = _usage(words, count)
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            answer["kv_transfer_params"] = self._kv_transfer_params()
        return JSONResponse(answer)

    async def _stream(self, chat: bool, count: int, usage_words: int | None) -> AsyncIterator[str]:
        finished = False
        try:
            for i in range(count):
                if i:
                    await asyncio.sleep(self.behaviour.token_interval_s)
                last = i == count - 1
                choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                token = self._token(i)
                choice |= {"delta": {"content": token}} if chat else {"text": token}
                yield _event(self._envelope(chat, stream=True, choice=choice))
            if usage_words is not None:
                chunk = self._envelope(chat, stream=True, choice=None)
                chunk["usage"] = _usage(usage_words, count)
                yield _event(chunk)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                self.record.streams_completed += 1
            else:
                self.record.streams_cut += 1
                self.record.cut.set()

    async def _held(self, request: Request, gate: threading.Event) -> bool:
        """Waits until `gate` is set; True (and recorded) if the caller hung up meanwhile."""
        while not gate.is_set():
            if await self._cut_short(request, POLL_S):
                return True
        return False

    async def _cut_short(self, request: Request, seconds: float) -> bool:
        """Waits `seconds`; True (and recorded) if the caller hung up meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, POLL_S))
            if await request.is_disconnected():
                self.record.whole_cut += 1
                self.record.cut.set()
                return True
        return False

    def _kv_transfer_params(self) -> dict[str, Any]:
        """What vLLM's NixlConnector returns from a prefill asked `do_remote_decode`: where the
        decode engine pulls the KV from. A PD router (vllm-router) passes it on to decode."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.behaviour.name,
            "remote_request_id": f"cmpl-{self.behaviour.name}",
            "remote_block_ids": [0],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "tp_size": 1,
        }

    def _token(self, i: int) -> str:
        return f" {self.behaviour.name}{i}"

    def _envelope(self, chat: bool, stream: bool, choice: dict[str, Any] | None) -> dict[str, Any]:
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": f"cmpl-{self.behaviour.name}",
            "object": kind + ".chunk" if stream and chat else kind,
            "created": int(time.time()),
            "model": self.behaviour.model,
            "choices": [choice] if choice else [],
            "sent_at": time.time(),
        }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def main(argv: list[str] | None = None) -> None:
    """`python -m splitwise_testing.fake_engine`: one fake engine in its own process (the
    proxy benchmark drives the proxy at load with these)."""
    parser = argparse.ArgumentParser(description="fake OpenAI engine for proxy tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    behaviour = FakeBehaviour(
        name=args.name, tokens=args.tokens, token_interval_s=args.token_interval_ms / 1000
    )
    uvicorn.run(
        FakeEngine(behaviour).app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
