"""OpenAI-compatible HTTP API (chat and text completions) in front of the engine."""
