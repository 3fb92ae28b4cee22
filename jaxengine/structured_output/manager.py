"""`StructuredOutputManager`: the engine's grammar backend, its compiled-grammar cache, the thread
pool that compiles, and each step's bitmask.

Compiling a grammar against the vocabulary takes milliseconds to seconds, so it never runs on the
step loop: `request` checks the spec (cheap, raising ValueError with the backend's message),
then submits the compile to a thread pool (or takes the cached `Future` of an equal spec). The
request waits in the scheduler's queue until its grammar is ready, while others run.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from jaxengine.sampling_params import StructuredOutputsParams
from jaxengine.structured_output.backends import BACKENDS, GrammarBackend
from jaxengine.structured_output.grammar_request import ALL_ALLOWED, GrammarRequest
from jaxengine.structured_output.grammar_spec import GrammarSpec, grammar_spec

CACHE_SIZE = 1024  # compiled grammars kept (LRU); a JSON schema's is tens of KB to a few MB


@dataclass
class GrammarCacheStats:
    hits: int = 0
    misses: int = 0


class _Row(Protocol):
    """What `bitmask` reads of a scheduled request (jaxengine.core.sched.output.ScheduledRequest)."""

    request: Any  # has .structured_output: GrammarRequest | None
    sample: bool


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed token bitmask: bit t % 32 of word t // 32 is token t."""
    return math.ceil(vocab_size / 32)


class StructuredOutputManager:
    def __init__(self, backend: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 compile_threads: int = 2, disable_any_whitespace: bool = False):
        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer")
        self.vocab_size = vocab_size
        self.disable_any_whitespace = disable_any_whitespace
        self.backend = make_backend(backend, tokenizer, vocab_size, stop_token_ids, max_threads=compile_threads)
        self._pool = ThreadPoolExecutor(compile_threads, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_stats = GrammarCacheStats()

    def request(self, params: StructuredOutputsParams) -> GrammarSpec:
        """Check `params` (ValueError with the backend's message) and start compiling it (or
        reuse the cached grammar of an equal spec). Returns the spec; `grammar_request` makes
        each sample's matcher state from it."""
        spec = grammar_spec(params, self.disable_any_whitespace)
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                self.cache_stats.hits += 1
                return spec
        self.backend.check(spec)
        with self._lock:
            self.cache_stats.misses += 1
            self._cache[spec] = self._pool.submit(self.backend.compile, spec)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return spec

    def grammar_request(self, spec: GrammarSpec) -> GrammarRequest:
        """A sample's own grammar state over the (shared) compiled grammar of `spec`."""
        with self._lock:
            future = self._cache.get(spec)
        if future is None:  # evicted between request() and now
            future = self._pool.submit(self.backend.compile, spec)
        return GrammarRequest(future, self.backend.matcher)

    def bitmask(self, scheduled: Sequence[_Row], num_rows: int) -> np.ndarray | None:
        """The step's packed token bitmask [num_rows, W] int32 (every bit set in unconstrained and
        padding rows), or None when no sampled row is constrained: then the sampler runs its
        unmasked program and nothing is uploaded."""
        rows = [(i, s.request.structured_output) for i, s in enumerate(scheduled)
                if s.sample and s.request.structured_output is not None]
        if not rows:
            return None
        mask = np.full((num_rows, bitmask_words(self.vocab_size)), ALL_ALLOWED, np.int32)
        # Rows left all-allowed: requests finished by the step just collected (this step's token
        # is dropped) and grammars that have terminated.
        live = [(i, g.matcher) for i, g in rows
                if not scheduled[i].request.is_finished and g.matcher is not None and not g.matcher.is_terminated()]
        if live:
            self.backend.fill_rows([m for _, m in live], mask, [i for i, _ in live])
        return mask

    def wait_for_compiles(self, timeout: float) -> None:
        """Block up to `timeout` s until a compile in progress ends (a step loop with nothing
        else to run would otherwise spin)."""
        with self._lock:
            running = [f for f in self._cache.values() if not f.done()]
        if running:
            wait(running, timeout, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 max_threads: int = 2) -> GrammarBackend:
    """The backend `name`; `tokenizer`: the engine's Hugging Face tokenizer; `vocab_size`: the logits width."""
    if name in BACKENDS:
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"structured outputs with the {name} backend need the {name} package: "
                             "pip install 'jaxengine[structured-outputs]'") from None
    if name == "xgrammar":
        from jaxengine.structured_output.xgrammar_backend import XgrammarBackend

        return XgrammarBackend(tokenizer, vocab_size, stop_token_ids, max_threads=max_threads)
    if name == "llguidance":
        from jaxengine.structured_output.llguidance_backend import LlguidanceBackend

        return LlguidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
