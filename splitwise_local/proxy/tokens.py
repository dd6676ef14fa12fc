"""A request's prompt token ids, computed in the proxy the way the vLLM engine will compute them.

KV-aware routing needs the engine's exact token ids: the store's chunk keys are digests of them,
and one token off changes every key from there on. So this module follows vLLM 0.32's HF
renderer (`vllm/renderers/hf.py`, `chat_utils.py`) for text-only requests, with the model's own
tokenizer and chat template (transformers, as vLLM uses):

- chat: each message's content becomes a string (text parts joined by newlines) or, for a
  template that loops over content parts, a list of text parts; `name`, `tool_call_id` and an
  assistant's `reasoning` are kept; then `apply_chat_template(..., tokenize=True)` with the
  request's `add_generation_prompt` (default true), `continue_final_message`, `documents`,
  `reasoning_effort`, `chat_template` and `chat_template_kwargs`;
- completions: a string prompt is encoded with special tokens unless `add_special_tokens` is
  false; a list of token ids is used as given when every id is in the vocabulary.

What this does not follow (images, audio, tools, tool calls, developer messages, truncation,
batches of prompts, a server-side `--chat-template`) gives `None`: the router then routes
without KV knowledge, which is always safe. tests/proxy/test_routing_engine.py checks the ids
against the engine's own `/tokenize` on the edge cases.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
COMPLETION_ROUTE = "/v1/completions"
# A template that iterates over a message's content expects OpenAI-style parts (vLLM detects
# the same from the template's syntax tree: `_detect_content_format`).
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content)")
_UNSUPPORTED_CHAT_FIELDS = (
    "tools",
    "truncate_prompt_tokens",
    "prompt_embeds",
    "mm_processor_kwargs",
)
_KEPT_MESSAGE_FIELDS = ("name", "tool_call_id")


class Unsupported(Exception):
    """A request whose token ids this module cannot promise to compute as the engine does."""


class PromptTokenizer:
    """The model's tokenizer and chat template; `token_ids(route, body)` or None."""

    def __init__(self, model: str | Path) -> None:
        # Heavy (transformers takes seconds to import): only a proxy that routes by tokens pays.
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        template = self.tokenizer.chat_template
        self._openai_parts = bool(template and _LOOPS_OVER_CONTENT.search(template))

    def token_ids(self, route: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids for this request, or None when it is beyond this module."""
        try:
            if route == CHAT_ROUTE:
                return self._chat(body)
            if route == COMPLETION_ROUTE:
                return self._completion(body)
        except Unsupported as exc:
            log.debug("no token ids for this request: %s", exc)
        except Exception as exc:  # a template that rejects the request: the engine will say why
            log.debug("tokenizing failed: %s", exc)
        return None

    def _completion(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of one
        if body.get("truncate_prompt_tokens") is not None or body.get("prompt_embeds"):
            raise Unsupported("truncation or prompt embeddings")
        if isinstance(prompt, str):
            special = body.get("add_special_tokens", True)
            return list(self.tokenizer.encode(prompt, add_special_tokens=bool(special)))
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            if not all(0 <= t < len(self.tokenizer) for t in prompt):
                # vLLM rejects such a prompt with a 400; its keys cannot even be hashed.
                raise Unsupported("a token id outside the vocabulary")
            return list(prompt)
        raise Unsupported("the prompt is neither a string nor one list of token ids")

    def _chat(self, body: dict[str, Any]) -> list[int]:
        if any(body.get(field) for field in _UNSUPPORTED_CHAT_FIELDS):
            raise Unsupported("tools, truncation, embeddings or multimodal options")
        if body.get("add_special_tokens"):
            raise Unsupported("add_special_tokens on a chat request")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Unsupported("no messages")
        conversation = [self._message(message) for message in messages]
        kwargs: dict[str, Any] = dict(body.get("chat_template_kwargs") or {})
        if {"tokenize", "chat_template"} & kwargs.keys():
            raise Unsupported("chat_template_kwargs the engine refuses")
        kwargs["add_generation_prompt"] = body.get("add_generation_prompt", True)
        kwargs["continue_final_message"] = body.get("continue_final_message", False)
        kwargs["documents"] = body.get("documents")
        kwargs["reasoning_effort"] = effort = body.get("reasoning_effort")
        if effort is not None and "enable_thinking" not in kwargs:
            kwargs["enable_thinking"] = effort != "none"
        ids = self.tokenizer.apply_chat_template(
            conversation,
            tools=None,
            chat_template=body.get("chat_template"),
            tokenize=True,
            return_dict=False,
            **kwargs,
        )
        return list(ids)

    def _message(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise Unsupported("a message without a role")
        role = message["role"]
        if role == "developer" or message.get("tool_calls"):
            raise Unsupported("developer messages and tool calls")
        texts = _texts(message.get("content"))
        if self._openai_parts:
            content: Any = [{"type": "text", "text": text} for text in texts]
        else:
            content = "\n".join(texts)
        parsed: dict[str, Any] = {"role": role, "content": content}
        for field in _KEPT_MESSAGE_FIELDS:
            if isinstance(message.get(field), str):
                parsed[field] = message[field]
        if role == "assistant" and message.get("reasoning") is not None:
            parsed["reasoning"] = parsed["reasoning_content"] = message["reasoning"]
        return parsed


def _texts(content: Any) -> list[str]:
    """A message content's text parts (a string is one part; None is none)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise Unsupported("content is neither a string nor a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and "text" in part:
            texts.append(str(part["text"]))
        else:
            raise Unsupported("a content part that is not text")
    return texts
