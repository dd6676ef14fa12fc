"""A stand-in for vLLM that the launcher's fast tests put first on PYTHONPATH.

Only `python -m vllm.entrypoints.openai.api_server` exists: a tiny OpenAI-compatible server that
starts in a fraction of a second, so the supervisor's start, watch and stop paths can be tested
with real child processes without waiting a minute for a real engine.
"""
