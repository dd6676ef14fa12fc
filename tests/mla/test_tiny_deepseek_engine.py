"""Greedy output of the tiny DeepSeek-V2 (MLA on) is the same from two cold plain vLLM engines.

The recipe in `splitwise_local.models.tiny_deepseek` was chosen so bf16 near-ties rarely decide a
greedy step; this measures what matters to the identity tests that use the model as their
reference: each prompt, asked of one engine and then of a fresh one, gives the same 32 tokens.
The smallest top-1/top-2 logit margin per prompt is printed (`-s`) to show how close it came.
Marked `engine`: starts two real engines, one after the other.
"""

from __future__ import annotations

import pytest

from splitwise_testing.system import PROSE, start_system

pytestmark = pytest.mark.engine

PROMPT_LENGTHS = (20, 20, 129, 129, 400, 400)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(tiny_dir) -> dict[str, list[int]]:
    """Prompts of exact token lengths from different places in the text."""
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(tiny_dir)(PROSE.read_text(), add_special_tokens=False)
    ids = tokens["input_ids"]
    return {
        f"{n} tokens @{i * 601}": ids[i * 601 : i * 601 + n] for i, n in enumerate(PROMPT_LENGTHS)
    }


def cold_run(root, model, prompts) -> dict[str, tuple[list[int], float]]:
    """Each prompt's greedy tokens and smallest top-2 logit margin, from a fresh engine."""
    system = start_system(root, model, None, {"plain": "plain"})
    try:
        answers = {}
        for key, prompt in prompts.items():
            choice = system.engines["plain"].complete(prompt, NEW_TOKENS, logprobs=2)["choices"][0]
            margins = [
                top[0] - top[1]
                for step in choice["logprobs"]["top_logprobs"]
                if len(top := sorted(step.values(), reverse=True)) > 1
            ]
            answers[key] = (choice["token_ids"], min(margins))
        return answers
    finally:
        system.stop()


def test_two_cold_plain_engines_answer_the_same_greedy_tokens(tmp_path, tiny_dir, prompts):
    first = cold_run(tmp_path / "first", tiny_dir, prompts)
    second = cold_run(tmp_path / "second", tiny_dir, prompts)
    for key in prompts:
        print(
            f"{key}: smallest top-2 margin {first[key][1]:.4f}, {len(set(first[key][0]))} distinct"
        )
    unstable = [key for key in prompts if first[key][0] != second[key][0]]
    assert not unstable, f"greedy output changed between cold engines: {unstable}"
    assert len({tuple(tokens) for tokens, _ in first.values()}) == len(prompts)
