"""Routing tests' shared pieces: prompts, a chat body, storing a prompt as a prefill engine
would, and reading the proxy's decisions (the `x-splitwise-route` header, /metrics)."""

from __future__ import annotations

from pathlib import Path

import httpx

from splitwise_local.config import SplitwiseConfig
from splitwise_local.connector.keys import NO_EXTRAS, KeyExtras, chunk_keys
from splitwise_local.proxy.prefix import engine_identity
from splitwise_local.proxy.tokens import PromptTokenizer
from splitwise_local.store.backend import open_backend
from splitwise_testing.scrape import total

CHUNK = 32
THRESHOLD = 64
LONG = "Tell me everything you know about the long history of the city. " * 12  # ~170 tokens
OTHER = "Rivers and mountains shape where people settle, farm and trade. " * 12


def chat(text: str, stream: bool = False) -> dict:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    return {**body, "max_tokens": 3, "stream": stream}


def send(url: str, body: dict) -> httpx.Response:
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def store_prompt(
    tokenizer: PromptTokenizer,
    model: Path,
    config: SplitwiseConfig,
    text: str,
    extras: KeyExtras = NO_EXTRAS,
) -> int:
    """Puts (dummy) values under the prompt's chunk keys (a request with `extras`), as a prefill
    engine would; returns the prompt's token count."""
    ids = tokenizer.token_ids("/v1/chat/completions", chat(text))
    assert ids is not None
    identity = engine_identity(model, "bfloat16", config.chunk_size)
    with open_backend(config.remote_url, config) as client:
        for key in chunk_keys(identity, ids, extras):
            client.put(key, b"kv")
    return len(ids)


def route_of(reply: httpx.Response) -> dict[str, str]:
    """The `x-splitwise-route` header's fields: path, reason, policy, prompt_tokens, ..."""
    fields = (item.split("=", 1) for item in reply.headers["x-splitwise-route"].split("; "))
    return dict(fields)


def routes_counted(url: str, policy: str, path: str, reason: str) -> float:
    """How many decisions the proxy at `url` counted with these labels."""
    labels = {"policy": policy, "path": path, "reason": reason}
    return total(url, "splitwise_proxy_routes_total", **labels)
