"""The engine's logprobs ({token id: Logprob} per position) in OpenAI's two shapes.

- completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token
  string: logprob}, the top k and the sampled token) and `text_offset` (where each token
  starts in the choice's text, echoed prompt included);
- chat: `content`, one `{token, logprob, bytes, top_logprobs: [...]}` per token.

A token's string is its own decode (as vLLM does: a token that holds part of a UTF-8
character decodes to U+FFFD). -inf becomes -9999.0, as in vLLM: JSON has no infinity.
"""

from __future__ import annotations

import math
from typing import Any

from jaxengine.outputs import Logprob
from serving.openai_api.protocol import CompletionLogprobs, TokenLogprob, TopLogprob

_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


class TokenStrings:
    """Token id -> its decoded text, cached (the same ids come back all the time)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = "" if self._tokenizer is None else self._tokenizer.decode([token_id])
            self._cache[token_id] = s
        return s


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank)
    return top


def append_completion(out: CompletionLogprobs, token_ids: list[int], entries: list[dict[int, Logprob] | None],
                      k: int, strings: TokenStrings, offset: int) -> int:
    """Add tokens (and their logprob entries; None for the first prompt token, which nothing
    predicts) to `out`; returns the text offset after them."""
    for tok, entry in zip(token_ids, entries):
        s = strings(tok)
        out.tokens.append(s)
        out.text_offset.append(offset)
        offset += len(s)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        sampled = entry.get(tok)
        out.token_logprobs.append(None if sampled is None else _finite(sampled.logprob))
        top = {strings(t): _finite(lp.logprob) for t, lp in _ranked(entry, k)}
        if sampled is not None:
            top.setdefault(s, _finite(sampled.logprob))
        out.top_logprobs.append(top)
    return offset


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode("utf-8")))


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int,
                  strings: TokenStrings) -> list[TokenLogprob]:
    result = []
    for tok, entry in zip(token_ids, entries):
        s = strings(tok)
        sampled = entry.get(tok)
        lp = _finite(sampled.logprob) if sampled is not None else _FLOOR
        result.append(TokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")),
                                   top_logprobs=[_top(strings(t), x.logprob) for t, x in _ranked(entry, k)]))
    return result
