"""Public entry points: `LLM` and `generate` (llm.py)."""
