"""`GrammarRequest`: one request's grammar state, from its compile job to its matcher."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

from jaxengine.structured_output.backends import Matcher

ALL_ALLOWED = -1  # an int32 bitmask word with every bit set


class GrammarRequest:
    """Held by the request (`Request.structured_output`). The scheduler admits it once
    `is_ready()` (its grammar compiled off the step loop); then the matcher follows every accepted
    token, and each step fills the request's bitmask row (manager.py) before the sampler runs."""

    __slots__ = ("_future", "_make_matcher", "matcher", "num_accepted")

    def __init__(self, future: Future, make_matcher: Callable[[Any], Matcher]):
        self._future = future
        self._make_matcher = make_matcher
        self.matcher: Matcher | None = None
        self.num_accepted = 0

    def is_ready(self) -> bool:
        """The grammar is compiled (the matcher is made here, once). A compile that failed
        raises its error here, in the step loop that admits the request."""
        if self.matcher is None:
            if not self._future.done():
                return False
            self.matcher = self._make_matcher(self._future.result())
        return True

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds for the compile (when nothing else can run)."""
        try:
            self._future.result(timeout)
        except TimeoutError:
            pass

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar rejects it."""
        ok = self.matcher.accept_token(token_id)
        self.num_accepted += ok
        return ok

    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        self.matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens
