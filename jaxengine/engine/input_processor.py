"""InputProcessor: a prompt and its sampling parameters checked, and the prompt turned into
token ids, before a request reaches the scheduler (vLLM's Processor). Every way in (LLM,
`jaxengine.generate`, `Engine.add_request`, `AsyncEngine`, an engine process's clients and
so the gRPC service) goes through the same two checks, so the rules and messages are one:

- `prompt_token_ids(prompt)` where the prompt is text or ids (the front end: in this
  process, or in an engine process's client, which tokenizes);
- `check_request(ids, params)` where the request enters the engine core.

A prompt that can never run raises ValueError (the gRPC service answers INVALID_ARGUMENT); a
prompt of the wrong type raises TypeError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxengine.sampling_params import SamplingParams

# vLLM's words for the same rule.
EMPTY_PROMPT = "The decoder prompt cannot be empty: pass non-empty text or at least one token id"

Prompt = str | Sequence[int]


def _check_text(text: str) -> None:
    """Text the tokenizer can take: valid Unicode (a lone surrogate cannot be encoded)."""
    if not text:
        raise ValueError(EMPTY_PROMPT)
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the prompt text cannot be encoded as UTF-8: {text[e.start:e.end]!r} at character {e.start} is a "
            "lone surrogate; pass valid Unicode text or a list of token ids"
        ) from None


def _valid_token_ids(ids: Sequence[int], vocab: int) -> bool:
    """All of `ids` are integers in [0, vocab): one vectorised check instead of a Python loop."""
    try:
        arr = np.asarray(ids)
    except ValueError:  # ragged nesting
        return False
    return arr.ndim == 1 and arr.dtype.kind in "iu" and int(arr.min()) >= 0 and int(arr.max()) < vocab


class InputProcessor:
    def __init__(self, *, tokenizer: Any, vocab_size: int, max_model_len: int, max_n: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_n = max_n

    def prompt_token_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(the text or None, the token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            _check_text(prompt)
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids instead of text")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}: "
                "decode the bytes first (e.g. prompt.decode('utf-8'))"
            )
        if prompt is None or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"a prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise ValueError(EMPTY_PROMPT)
        return None, ids

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError for a request that can never run: empty, too long, token ids or
        logit_bias outside the vocabulary, more samples than max_n."""
        ids = prompt_token_ids
        if not ids:
            raise ValueError(EMPTY_PROMPT)
        vocab = self.vocab_size
        if not _valid_token_ids(ids, vocab):  # the slow scan only to name the bad ids
            bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {bad[:5]}")
        if params.n > self.max_n:
            raise ValueError(
                f"n={params.n} is above this engine's max_n={self.max_n} (samples per request); "
                "lower n, or start the engine with a larger max_n"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}; shorten the prompt or lower max_tokens"
            )
