"""The grammar backends an engine may use (`structured_outputs_backend`), what each must offer,
and `make_backend`. A backend turns a `GrammarSpec` into a compiled grammar (`check` cheaply on
the request's way in, `compile` on the manager's thread pool) and makes per-request `Matcher`s;
both fill masks in one packed layout: bit t % 32 of int32 word t // 32 is token t."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from jaxengine.structured_output.grammar_spec import GrammarSpec

BACKENDS = ("xgrammar", "llguidance")


class Matcher(Protocol):
    """A request's position in its grammar (xgrammar.GrammarMatcher's method names)."""

    def accept_token(self, token_id: int) -> bool: ...
    def fill_next_token_bitmask(self, bitmask: np.ndarray, index: int) -> Any: ...  # bitmask [S, W] int32
    def is_terminated(self) -> bool: ...
    def rollback(self, num_tokens: int) -> Any: ...


class GrammarBackend(Protocol):
    name: str

    def check(self, spec: GrammarSpec) -> None: ...  # ValueError with the library's message
    def compile(self, spec: GrammarSpec) -> Any: ...
    def matcher(self, compiled: Any) -> Matcher: ...


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 max_threads: int = 2) -> GrammarBackend:
    """`tokenizer`: the engine's Hugging Face tokenizer; `vocab_size`: the model's logits width."""
    if name == "xgrammar":
        from jaxengine.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(tokenizer, vocab_size, stop_token_ids, max_threads=max_threads)
    if name == "llguidance":
        from jaxengine.structured_output.llguidance_backend import LlguidanceBackend

        return LlguidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
