"""The acceptance check: through the proxy, the same text as the decode engine alone.

Shared by the fake-engine suite (which proves the check itself) and the real-engine test.
"""

from __future__ import annotations

import json

import httpx

TIMEOUT_S = 300
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def ask(base: str, model: str, chat: bool, stream: bool) -> tuple[str, dict | None]:
    """Greedy answer text, and the usage counts, for the fixed prompt."""
    body: dict = {"model": model, "max_tokens": 16, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": QUESTION}]
    else:
        body["prompt"] = PROMPT
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = httpx.post(base + path, json=body, timeout=TIMEOUT_S)
    reply.raise_for_status()
    if not stream:
        answer = reply.json()
        choice = answer["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), answer["usage"]
    text, usage = [], None
    for event in reply.text.split("\n\n"):
        data = event.removeprefix("data: ").strip()
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(text), usage


def assert_proxy_matches_decode(proxy: str, decode: str, model: str) -> None:
    """Chat and completion, whole and streamed: same text and usage via the proxy as direct."""
    for chat in (False, True):
        for stream in (False, True):
            direct_text, direct_usage = ask(decode, model, chat, stream)
            proxied_text, proxied_usage = ask(proxy, model, chat, stream)
            case = f"{'chat' if chat else 'completion'}, {'streamed' if stream else 'whole'}"
            assert direct_text, f"{case}: the decode engine answered no text"
            assert proxied_text == direct_text, case
            assert proxied_usage == direct_usage, case
