"""The grammar backends an engine may use (`structured_outputs_backend`), what each must offer.
A backend turns a `GrammarSpec` into a compiled grammar (`check` cheaply on
the request's way in, `compile` on the manager's thread pool) and makes per-request `Matcher`s;
both fill masks in one packed layout: bit t % 32 of int32 word t // 32 is token t. The manager
(manager.py `make_backend`) picks one by name."""

from __future__ import annotations

from collections.abc import Sequence
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
    # Every matcher's next-token mask into its row of `bitmask` [S, W] int32, on the library's
    # own threads: a batch's masks are on the step's critical path.
    def fill_rows(self, matchers: Sequence[Matcher], bitmask: np.ndarray, rows: Sequence[int]) -> None: ...
