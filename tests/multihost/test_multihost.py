"""Beyond one host, for real: the docs' multi-host recipes, each host a network namespace.

The store (our store, or Mooncake's master), a prefill engine and a decode engine each run in a
Linux network namespace of their own, linked to the root namespace's bridge by veth pairs with
addresses this test assigns; the proxy runs in the root namespace. The commands are the ones in
README.md ("Several hosts") and docs/mooncake.md ("Multi-host recipe"), as written (recipe.py
says the two substitutions). Through the proxy (`--disagg auto`): a new long prompt goes
through prefill and its KV crosses to the decode engine over the links (external hits = the
prompt's tokens but the last, as on one host); the same prompt again goes straight to decode;
a short prompt too; the answers are a plain engine's, token for token, and both stores give
the same answers and hit counts.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from splitwise_local.samples import LONG_PROMPT, SHORT_PROMPT
from splitwise_local.serve.ports import free_port
from splitwise_local.serve.process import RUN_ENV, terminate
from splitwise_testing.launch import sweep
from splitwise_testing.scrape import total
from tests.multihost.recipe import (
    DOC_HOSTS,
    blocks,
    commands,
    run_commands,
    section,
    wait_http,
)
from tests.netns import Network, netns_problem
from tests.proxy.routes import route_of

pytestmark = [
    pytest.mark.engine,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(netns_problem() is not None, reason=str(netns_problem())),
]
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600
NEW_TOKENS = 24
HITS = "vllm:external_prefix_cache_hits_total"
LOCAL_HITS = "vllm:prefix_cache_hits_total"
RESULTS: dict[str, dict] = {}  # per store: what the other store's run must match


def ours(workdir: Path, addresses: dict[str, str]) -> list[str]:
    """README's recipe: engines.yaml and the commands."""
    text = section((ROOT / "README.md").read_text(), "### Several hosts")
    config = blocks(text, "yaml")[0]
    for doc, real in addresses.items():
        config = config.replace(doc, real)
    (workdir / "engines.yaml").write_text(config)
    return commands(blocks(text, "bash")[0])


def mooncake(workdir: Path, addresses: dict[str, str]) -> list[str]:
    """docs/mooncake.md's recipe: the YAML at its top, per engine host, and the commands."""
    text = (ROOT / "docs" / "mooncake.md").read_text()
    config = yaml.safe_load(blocks(text, "yaml")[0])
    master = addresses[DOC_HOSTS[0]]
    config["remote_url"] = config["remote_url"].replace(DOC_HOSTS[0], master)
    for name, doc in (("B", DOC_HOSTS[1]), ("C", DOC_HOSTS[2])):
        config["mooncake"]["local_hostname"] = addresses[doc]
        (workdir / f"mooncake-{name}.yaml").write_text(yaml.safe_dump(config))
    return commands(blocks(section(text, "## Multi-host recipe"), "bash")[0])


RECIPES = {"splitwise": ours, "mooncake": mooncake}


def chat(model: str, content: str, salt: str | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    return {**body, "cache_salt": salt} if salt else body


def answer(reply: httpx.Response) -> list[int]:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Iterator[str]:
    """A plain engine in the root namespace, started as the recipe starts engines."""
    root = tmp_path_factory.mktemp("reference")
    port = free_port()
    command = [sys.executable, "-m", "splitwise_local", "engine", "--role", "plain",
               "--port", str(port)]  # fmt: skip
    env = {**os.environ, RUN_ENV: str(root)}  # tags its EngineCore too, for the sweep below
    with (root / "plain.log").open("wb") as log:  # the child writes to its own copy
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate(process, grace=60)
        sweep(root)


@pytest.fixture(params=list(RECIPES))
def recipe_run(request, tmp_path):
    """A recipe's hosts, running; Mooncake's fails at once when Mooncake is missing (before the
    reference engine starts), since setup installs it."""
    if request.param == "mooncake" and importlib.util.find_spec("mooncake") is None:
        pytest.fail("Mooncake is not installed: `bash scripts/setup.sh` installs it")
    reference = request.getfixturevalue("reference")
    with Network() as net:
        roles = ("store", "prefill", "decode")
        hosts = {doc: net.add(role) for doc, role in zip(DOC_HOSTS, roles, strict=True)}
        addresses = {doc: host.address for doc, host in hosts.items()}
        lines = RECIPES[request.param](tmp_path, addresses)
        running = run_commands(lines, hosts, tmp_path, free_port())
        try:
            prefill = f"http://{addresses[DOC_HOSTS[1]]}:8010"
            decode = f"http://{addresses[DOC_HOSTS[2]]}:8020"
            for url in (prefill, decode, reference, running.proxy_url):
                wait_http(f"{url}/health", running, START_TIMEOUT_S)
            yield request.param, running, decode
        finally:
            running.stop()


def test_recipe_serves_across_namespaces_like_one_host(recipe_run, reference):
    store, running, decode = recipe_run
    proxy = running.proxy_url
    model = httpx.get(f"{proxy}/v1/models", timeout=10).json()["data"][0]["id"]

    def plain(content: str) -> list[int]:
        """The reference's answer, computed cold (a fresh cache salt: no prefix cache hit)."""
        body = chat(model, content, salt=uuid.uuid4().hex)
        return answer(httpx.post(f"{reference}/v1/chat/completions", json=body, timeout=600))

    def ask(content: str) -> tuple[dict, list[int], float, float]:
        hits, local = total(decode, HITS), total(decode, LOCAL_HITS)
        reply = httpx.post(f"{proxy}/v1/chat/completions", json=chat(model, content), timeout=600)
        tokens = answer(reply)
        return (
            route_of(reply),
            tokens,
            total(decode, HITS) - hits,
            total(decode, LOCAL_HITS) - local,
        )

    route, first, hits, _ = ask(LONG_PROMPT)
    prompt_tokens = int(route["prompt_tokens"])
    assert (route["path"], route["reason"]) == ("disaggregated", "long_uncached"), (
        running.log_tails()
    )
    assert hits == prompt_tokens - 1  # the KV crossed from the prefill host to the decode host
    route, again, hits_again, local_again = ask(LONG_PROMPT)
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    assert int(route["stored_tokens"]) == prompt_tokens
    assert hits_again + local_again == prompt_tokens - 1  # only the last token computed
    route, short, _, _ = ask(SHORT_PROMPT)
    assert (route["path"], route["reason"]) == ("direct", "short_prompt")

    reference_long = plain(LONG_PROMPT)
    assert first == reference_long and again == reference_long
    assert short == plain(SHORT_PROMPT)
    RESULTS[store] = {"answers": (first, again, short), "hits": (hits, hits_again + local_again)}
    if len(RESULTS) == len(RECIPES):
        assert RESULTS["splitwise"] == RESULTS["mooncake"]
