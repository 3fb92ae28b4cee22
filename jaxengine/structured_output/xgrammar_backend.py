"""The xgrammar backend: a `GrammarSpec` -> a compiled grammar -> per-request matchers.

`XgrammarBackend` holds the tokenizer's `xgrammar.TokenizerInfo` (built once per engine, over the
model's vocabulary so masks cover every logit) and a `GrammarCompiler`. `check` is cheap (the
grammar is parsed, not compiled against the vocabulary) and runs when a request is added, so a bad
spec is a ValueError with the library's message there; `compile` is the slow part and runs on the
manager's thread pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxengine.structured_output.backends import Matcher
from jaxengine.structured_output.grammar_spec import GrammarSpec


def _message(e: Exception) -> str:
    """xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: ": keep the message."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())


class XgrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], max_threads: int = 2):
        """`tokenizer`: the engine's Hugging Face tokenizer; `vocab_size`: the model's logits width
        (may exceed the tokenizer's); `stop_token_ids`: the engine's EOS ids, the only tokens a
        finished grammar allows."""
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=max_threads)
        self._batch = xgrammar.BatchGrammarMatcher(max_threads="auto")  # half the machine's cores

    def _grammar(self, spec: GrammarSpec) -> Any:
        g = self._xgr.Grammar
        if spec.kind == "json":
            return g.from_json_schema(spec.text, any_whitespace=spec.any_whitespace)
        if spec.kind == "regex":
            return g.from_regex(spec.text)
        if spec.kind == "grammar":
            return g.from_ebnf(spec.text)
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def check(self, spec: GrammarSpec) -> None:
        """ValueError with the backend's message if `spec` is not a grammar it can build."""
        try:
            self._grammar(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"invalid structured_outputs.{spec.kind}: {_message(e)}") from None

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (slow: every vocabulary token against the grammar's rules)."""
        if spec.kind == "json":
            return self.compiler.compile_json_schema(spec.text, any_whitespace=spec.any_whitespace)
        return self.compiler.compile_grammar(self._grammar(spec))

    def matcher(self, compiled: Any) -> Matcher:
        return self._xgr.GrammarMatcher(compiled)  # has Matcher's methods as they are

    def fill_rows(self, matchers: Sequence[Matcher], bitmask: np.ndarray, rows: Sequence[int]) -> None:
        self._batch.batch_fill_next_token_bitmask(list(matchers), bitmask, list(rows))
