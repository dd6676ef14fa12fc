"""`model prepare`'s folder is served by vLLM on the CPU and answers sensibly."""

import pytest

pytestmark = pytest.mark.engine


def test_the_prepared_model_knows_the_capital_of_france(reference):
    reply = reference.chat("What is the capital of France?", max_tokens=32)
    assert "Paris" in reply["choices"][0]["message"]["content"]
