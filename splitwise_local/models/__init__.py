"""Model folders: the embedded default model (SmolLM2), the tiny DeepSeek-V2, and the checks
that any checkpoint folder passes before an engine starts."""
