"""Sampling metadata: the per-row tensors the on-device sampler reads, and their host-side builder.

A request's sampling parameters that never change (temperature, top-k/top-p/min-p, penalty
strengths, seed) are written once, when it is admitted, into a row of a `StaticSampling`
table (one numpy array per field), so a step gathers all its rows with one `take` per field.
What changes per step (logit bias with min_tokens' EOS suppression,
the penalised token ids, logprobs) is built only for the rows that need it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.sampling_params import MAX_LOGPROBS, SamplingParams

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as vLLM)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters. One row per scheduled sequence; padding rows get neutral values."""

    temperature: jax.Array  # [S] f32, < 1e-5 => greedy
    top_k: jax.Array  # [S] i32, <= 0 => off
    top_p: jax.Array  # [S] f32, >= 1.0 => off
    min_p: jax.Array  # [S] f32, 0.0 => off
    repetition_penalty: jax.Array  # [S] f32, 1.0 => off (prompt+output tokens)
    presence_penalty: jax.Array  # [S] f32 (output tokens)
    frequency_penalty: jax.Array  # [S] f32 (output tokens, times count)
    seeds: jax.Array  # [S] u32/i32 (key = PRNGKey(seed)), or [S, 2] u32 (hi, lo) words of a 64-bit seed
    positions: jax.Array  # [S] i32, index of the token being sampled
    logit_bias_ids: jax.Array  # [S, B] i32, -1 = padding
    logit_bias_values: jax.Array  # [S, B] f32
    penalty_token_ids: jax.Array  # [S, L] i32 prompt+output ids, -1 = padding
    penalty_is_output: jax.Array  # [S, L] bool, True where the id is a generated token


class SamplerVariant(NamedTuple):
    """The static switches of `sample()`: which compiled variant of the sampler a step runs.
    Hashable, so it is a static argument of the jitted step as it is."""

    num_logprobs: int  # top logprobs returned per row (0: only the chosen token's)
    use_top_k_top_p: bool  # False: skip the vocabulary sort (every row has top-k and top-p off)
    use_penalties: bool  # False: skip the penalty gather/scatter (every row neutral)
    all_greedy: bool  # True: skip the random numbers (every row greedy)


class SamplingMetadata(NamedTuple):
    """One step's sampler inputs: the per-row tensors (numpy) and the variant they need."""

    tensors: SamplingTensors
    variant: SamplerVariant


class StaticSampling(NamedTuple):
    """The sampling parameters of requests that never change, one array per SamplingTensors
    field and one row per request (a slot of the runner's input batch; row 0: padding)."""

    temperature: np.ndarray  # [N] f32
    top_k: np.ndarray  # [N] i32
    top_p: np.ndarray  # [N] f32
    min_p: np.ndarray  # [N] f32
    repetition_penalty: np.ndarray  # [N] f32
    presence_penalty: np.ndarray  # [N] f32
    frequency_penalty: np.ndarray  # [N] f32
    seeds: np.ndarray  # [N, 2] u32, the (hi, lo) words of a 64-bit seed

    @classmethod
    def neutral(cls, n: int) -> StaticSampling:
        """n rows of a padding sequence's parameters: greedy, every filter and penalty off."""
        f32 = lambda v: np.full(n, v, np.float32)  # noqa: E731
        return cls(temperature=f32(0.0), top_k=np.zeros(n, np.int32), top_p=f32(1.0), min_p=f32(0.0),
                   repetition_penalty=f32(1.0), presence_penalty=f32(0.0), frequency_penalty=f32(0.0),
                   seeds=np.zeros((n, 2), np.uint32))

    def write(self, row: int, params: SamplingParams, seed: int) -> None:
        """Set row `row` to a request's parameters (once, when it is admitted)."""
        self.temperature[row] = params.temperature
        self.top_k[row] = max(params.top_k, 0)
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.repetition_penalty[row] = params.repetition_penalty
        self.presence_penalty[row] = params.presence_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        self.seeds[row] = seed_to_words(seed)

    def take(self, rows: np.ndarray) -> StaticSampling:  # rows [S] intp
        """The given rows (one gather per field: a step's requests in its row order)."""
        return StaticSampling(*(a.take(rows, axis=0) for a in self))

    def extended(self, n: int) -> StaticSampling:
        """These rows and n neutral ones after them."""
        return StaticSampling(*(np.concatenate([a, b]) for a, b in zip(self, StaticSampling.neutral(n))))


def seed_to_words(seed: int) -> tuple[int, int]:
    """Host helper: a Python int seed (any 64-bit value, negative allowed) -> (hi, lo) u32 words.

    Row `[hi, lo]` of a `[S, 2]` `seeds` array gives exactly the key `PRNGKey(seed)` would give
    with 64-bit ints enabled; seeds in [0, 2**32) give `hi == 0`, identical to a `[S]` array.
    """
    s = int(seed) % (1 << 64)
    return s >> 32, s & 0xFFFFFFFF


class _Request(Protocol):
    """What the builder reads of a request (jaxengine.core.request.Request)."""

    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    all_token_ids: list[int]
    num_tokens: int
    num_prompt_tokens: int


class ScheduledRow(Protocol):
    """What the builder reads of a scheduled request (jaxengine.core.sched.output.ScheduledRequest)."""

    request: _Request
    num_tokens: int
    start_position: int


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def build_sampling_metadata(
    static: StaticSampling,  # [S] rows, the step's requests' (padding rows neutral)
    positions: np.ndarray,  # [S] int32, the position each row samples at
    sched: Sequence[ScheduledRow],  # the step's requests, row i = sched[i]
    special: list[int],  # the rows with logit bias, min_tokens, penalties or logprobs
) -> SamplingMetadata:
    """The step's SamplingTensors and sampler variant. The rows outside `special` need no
    per-step work here: this runs on the host's critical path every step."""
    s_pad = len(static.temperature)
    temperature, top_k, top_p = static.temperature, static.top_k, static.top_p

    biases: dict[int, dict[int, float]] = {}
    penalised: list[int] = []
    num_logprobs = 0
    for i in special:
        s = sched[i]
        req = s.request
        p = req.sampling_params
        if p.logit_bias or p.min_tokens:
            bias = dict(p.logit_bias) if p.logit_bias else {}
            # Outputs before the token being sampled (pending ones included): EOS and
            # stop tokens may not end the request before min_tokens.
            if s.start_position + s.num_tokens - req.num_prompt_tokens < p.min_tokens:
                for tok in (*p.stop_token_ids, *req.eos_token_ids):
                    bias[tok] = -math.inf
            if bias:
                biases[i] = bias
        if p.has_penalties:
            penalised.append(i)
        if p.logprobs:
            num_logprobs = MAX_LOGPROBS
    b = _pow2(max(map(len, biases.values()), default=0))
    bias_ids = np.full((s_pad, b), -1, np.int32)
    bias_vals = np.zeros((s_pad, b), np.float32)
    for i, bias in biases.items():
        bias_ids[i, : len(bias)] = list(bias)
        bias_vals[i, : len(bias)] = list(bias.values())
    length = _pow2(max((sched[i].request.num_tokens for i in penalised), default=1))
    pen_ids = np.full((s_pad, length), -1, np.int32)
    pen_out = np.zeros((s_pad, length), bool)
    for i in penalised:
        req = sched[i].request
        pen_ids[i, : req.num_tokens] = req.all_token_ids
        pen_out[i, req.num_prompt_tokens : req.num_tokens] = True
    all_greedy = bool((temperature < SAMPLING_EPS).all())
    # Greedy rows take the argmax, which top-k/top-p never remove: no variant for it.
    use_top_k_top_p = not all_greedy and bool((top_k > 0).any() or (top_p < 1).any())
    tensors = SamplingTensors(
        **static._asdict(), positions=positions,
        logit_bias_ids=bias_ids, logit_bias_values=bias_vals, penalty_token_ids=pen_ids, penalty_is_output=pen_out,
    )
    variant = SamplerVariant(num_logprobs=num_logprobs, use_top_k_top_p=use_top_k_top_p,
                             use_penalties=bool(penalised), all_greedy=all_greedy)
    return SamplingMetadata(tensors, variant)


def neutral_sampling_tensors(
    S: int, B: int = 1, L: int = 1, *, temperature: float = 1.0, seed_words: bool = False
) -> SamplingTensors:
    """Neutral (vLLM default) parameters for S rows, as device arrays (tests, references)."""
    f32 = lambda v: jnp.full((S,), v, jnp.float32)  # noqa: E731
    return SamplingTensors(
        temperature=f32(temperature),
        top_k=jnp.zeros((S,), jnp.int32),
        top_p=f32(1.0),
        min_p=f32(0.0),
        repetition_penalty=f32(1.0),
        presence_penalty=f32(0.0),
        frequency_penalty=f32(0.0),
        seeds=jnp.zeros((S, 2) if seed_words else (S,), jnp.uint32),
        positions=jnp.zeros((S,), jnp.int32),
        logit_bias_ids=jnp.full((S, B), -1, jnp.int32),
        logit_bias_values=jnp.zeros((S, B), jnp.float32),
        penalty_token_ids=jnp.full((S, L), -1, jnp.int32),
        penalty_is_output=jnp.zeros((S, L), jnp.bool_),
    )
