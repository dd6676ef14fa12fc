"""Streamed completions sent and timed chunk by chunk: what `bench serve` measures a server with.

Each request goes to `/v1/completions` with `stream=true` and usage in the stream; its output
length is made exact with two vLLM extensions, `ignore_eos` and `return_token_ids` (tokens per
chunk, since vLLM may coalesce tokens into one chunk when the client lags). A workload is sent at
given arrival times (open loop) or a number at a time (closed loop).

A 429 or 503 answer that says when to retry (`Retry-After`) is a refusal, not a failure: the
server's admission control turned the request away at once, as it is built to under overload.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np

from splitwise_bench.workloads import RequestSpec
from splitwise_local.progress import Progress

REFUSAL_STATUSES = (429, 503)


@dataclass
class RequestResult:
    """What one streamed request did; times in seconds, chunk times relative to its send."""

    spec: RequestSpec
    start_s: float  # send time, relative to the start of the run
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    end_s: float | None = None
    output_tokens: int = 0
    multi_token_chunks: int = 0
    usage: dict[str, Any] | None = None
    error: str | None = None
    scheduled_s: float | None = None  # open loop: when it was due, relative to the start
    status: int | None = None  # the answer's HTTP status (None: no answer)
    retry_after_s: float | None = None  # a non-200 answer's Retry-After, in seconds

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_s)

    @property
    def refused(self) -> bool:
        """Turned away by admission control: a 429 or 503 that says when to retry."""
        return self.status in REFUSAL_STATUSES and self.retry_after_s is not None

    @property
    def ttft_s(self) -> float:
        return self.chunk_s[0]

    @property
    def itl_s(self) -> list[float]:
        return np.diff(self.chunk_s).tolist()

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for a one-token answer)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.chunk_s[-1] - self.chunk_s[0]) / (self.output_tokens - 1)

    def problems(self) -> list[str]:
        """Where the counts disagree: the stream, the usage chunk and the workload."""
        if not self.ok:
            return []
        if self.usage is None:
            return ["no usage chunk in the stream"]
        found = []
        if self.usage.get("completion_tokens") != self.output_tokens:
            found.append(
                f"stream carried {self.output_tokens} tokens, usage says "
                f"{self.usage.get('completion_tokens')}"
            )
        if self.output_tokens != self.spec.output_len:
            found.append(f"asked for {self.spec.output_len} tokens, got {self.output_tokens}")
        if self.usage.get("prompt_tokens") != self.spec.prompt_len:
            found.append(
                f"prompt is {self.spec.prompt_len} tokens, usage says "
                f"{self.usage.get('prompt_tokens')}"
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.spec.index,
            "kind": self.spec.kind,
            "prompt_len": self.spec.prompt_len,
            "output_len": self.spec.output_len,
            "trace_row": self.spec.trace_row,
            "scheduled_s": None if self.scheduled_s is None else round(self.scheduled_s, 6),
            "start_s": round(self.start_s, 6),
            "ttft_ms": round(self.ttft_s * 1e3, 3) if self.ok else None,
            "tpot_ms": round(self.tpot_s * 1e3, 3) if self.ok else None,
            "e2e_ms": round(self.end_s * 1e3, 3) if self.ok and self.end_s else None,
            "chunk_ms": [round(t * 1e3, 3) for t in self.chunk_s],
            "output_tokens": self.output_tokens,
            "error": self.error,
            "problems": self.problems(),
            "status": self.status,
            "refused": self.refused,
            "refused_ms": round(self.end_s * 1e3, 3) if self.refused and self.end_s else None,
            "retry_after_s": self.retry_after_s,
        }


def request_body(spec: RequestSpec, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": spec.prompt if isinstance(spec.prompt, str) else list(spec.prompt),
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "return_token_ids": True,
    }


async def stream_request(
    client: httpx.AsyncClient, endpoint: str, model: str, spec: RequestSpec, run_start: float
) -> RequestResult:
    """Sends one request and times each streamed chunk; failures become `error`, not raises."""
    sent = time.perf_counter()
    result = RequestResult(spec=spec, start_s=sent - run_start)
    try:
        async with client.stream("POST", endpoint, json=request_body(spec, model)) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.end_s = time.perf_counter() - sent  # a refusal's latency
                result.retry_after_s = parse_retry_after(response.headers.get("retry-after"))
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"malformed chunk: {data[:200]}")
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error']}"
                    return result
                if chunk.get("usage"):
                    result.usage = dict(chunk["usage"])
                tokens = sum(_chunk_tokens(choice) for choice in chunk.get("choices") or [])
                if tokens:
                    result.chunk_s.append(now - sent)
                    result.output_tokens += tokens
                    result.multi_token_chunks += tokens > 1
        result.end_s = time.perf_counter() - sent
        if not result.chunk_s:
            result.error = "the stream carried no tokens"
    except (httpx.HTTPError, ValueError, TypeError) as exc:  # incl. malformed JSON
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds: delay-seconds or an HTTP date (RFC 9110); None when
    absent or neither."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):  # not a date, or one without a zone
        return None


def _chunk_tokens(choice: Any) -> int:
    """Tokens in one streamed choice: its token ids when the server sends them (vLLM), else
    one per chunk that carries text."""
    if not isinstance(choice, dict):
        raise ValueError(f"malformed choice in stream: {choice!r:.200}")
    if choice.get("token_ids") is not None:
        return len(choice["token_ids"])
    return 1 if choice.get("text") else 0


async def run_load(
    base_url: str,
    model: str,
    specs: list[RequestSpec],
    *,
    arrivals: list[float] | None,
    concurrency: int,
    timeout_s: float,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Sends `specs` at the `arrivals` times (open loop) or `concurrency` at a time (closed
    loop); returns the results in spec order and the run's duration in seconds."""
    endpoint = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    gate = asyncio.Semaphore(concurrency if arrivals is None else max(len(specs), 1))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        bar = Progress(total=len(specs), unit="req", disable=not progress)
        start = time.perf_counter()

        async def one(spec: RequestSpec, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with gate:
                result = await stream_request(client, endpoint, model, spec, start)
            result.scheduled_s = at if arrivals is not None else None
            bar.update()
            return result

        offsets = arrivals if arrivals is not None else [0.0] * len(specs)
        results = await asyncio.gather(*(one(s, t) for s, t in zip(specs, offsets, strict=True)))
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration
