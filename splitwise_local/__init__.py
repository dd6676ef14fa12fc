"""splitwise_local: disaggregated prefill and decode on one host.

A prefill vLLM engine computes a prompt's KV cache, our connector stores it in chunks in an
in-host CPU-DRAM KV store, a decode vLLM engine loads it and generates, and a proxy hides both
behind one OpenAI-compatible endpoint. `python -m splitwise_local` runs all of it.
"""

__version__ = "0.1.0"
