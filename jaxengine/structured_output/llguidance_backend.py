"""The llguidance backend (vLLM's other grammar library): the same specs, matchers with
xgrammar's method names, masks in the same packed layout.

llguidance builds a grammar's parser lazily, when a matcher is made, so `compile` only turns the
spec into llguidance's grammar text (checked once in `check`, which validates it against the
tokenizer). A matcher stops as soon as its grammar cannot be extended (before an EOS is sampled):
the scheduler then finishes the request ("stop") on the last content token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxengine.structured_output.backends import Matcher
from jaxengine.structured_output.grammar_spec import GrammarSpec


class _LlguidanceMatcher:
    __slots__ = ("_m", "_fill")

    def __init__(self, matcher: Any, fill: Any):
        self._m = matcher
        self._fill = fill

    def accept_token(self, token_id: int) -> bool:
        return self._m.consume_token(token_id) and not self._m.is_error()

    def fill_next_token_bitmask(self, bitmask: np.ndarray, index: int) -> None:  # bitmask [S, W] int32
        self._fill(self._m, bitmask, index)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)


class LlguidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        import llguidance
        import llguidance.hf
        import llguidance.numpy
        from llguidance.gbnf_to_lark import any_to_lark

        self._matcher_cls = llguidance.LLMatcher
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._fill_par = llguidance.numpy.fill_next_token_bitmask_par
        self._executor = llguidance.LLExecutor()  # its own thread pool
        self._to_lark = any_to_lark
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=list(stop_token_ids) or None)

    def _grammar(self, spec: GrammarSpec) -> str:
        m = self._matcher_cls
        if spec.kind == "json":
            return m.grammar_from_json_schema(spec.text, defaults={"whitespace_flexible": spec.any_whitespace})
        if spec.kind == "regex":
            return m.grammar_from_regex(spec.text)
        if spec.kind == "grammar":
            return m.grammar_from_lark(self._to_lark(spec.text))  # GBNF (or Lark) -> Lark
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def check(self, spec: GrammarSpec) -> None:
        try:
            error = self._matcher_cls.validate_grammar(self._grammar(spec), self.tokenizer)
        except Exception as e:  # gbnf_to_lark raises plain Exceptions for undefined rules
            error = str(e)
        if error:
            raise ValueError(f"invalid structured_outputs.{spec.kind}: {error.strip()}")

    def compile(self, spec: GrammarSpec) -> str:
        return self._grammar(spec)

    def matcher(self, compiled: str) -> Matcher:
        return _LlguidanceMatcher(self._matcher_cls(self.tokenizer, compiled, log_level=0), self._fill)

    def fill_rows(self, matchers: Sequence[Matcher], bitmask: np.ndarray, rows: Sequence[int]) -> None:
        self._fill_par(self._executor, [(m._m, row) for m, row in zip(matchers, rows)], bitmask)
