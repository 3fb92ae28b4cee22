"""On-device sampling: one step's logits -> sampled token ids (+ logprobs), inside the jitted step.

`sample(logits, t)` is pure and jittable; `t` is a `SamplingTensors` pytree
(jaxengine.sample.metadata) with one row per scheduled sequence (padding rows neutral).
Processing order follows vLLM V1:

1. **raw logprobs** -- `log_softmax` of the logits as they come from the model (vLLM V1's
   default `raw_logprobs`): the chosen token's logprob and the top-`num_logprobs`.
2. **logit bias** -- `logits[r, id] += value` for every `(id, value)` pair of the row
   (ids `-1` are padding; duplicate ids add up). The host side (metadata.py) also puts EOS /
   stop ids here with `-inf` while a request has fewer than `min_tokens` outputs.
3. **penalties** (vLLM semantics) -- repetition over prompt+output tokens: a logit of a token
   that occurs is divided by `p` when > 0 and multiplied by `p` otherwise; then
   `- frequency_penalty * (#occurrences in the output)` and
   `- presence_penalty * (occurs in the output)`.
3b. **grammar mask** (structured outputs; only in batches with a constrained row) -- tokens the
   row's grammar does not allow next become `-inf` (jaxengine.sample.grammar_mask), before
   temperature, min-p and top-k/top-p, so greedy rows too take the best allowed token.
4. **temperature** -- rows with `temperature < 1e-5` are greedy: argmax of the logits after
   steps 2-3 (steps 5-6 never change the argmax). Other rows are divided by `temperature`.
5. **min_p** -- drop tokens with `p < min_p * p_max` (done in log space:
   `x < x_max + log(min_p)`).
6. **top-k, then top-p** (one descending sort per row, only in the `use_top_k_top_p`
   variant) -- top-k keeps tokens `>=` the k-th largest value (`top_k <= 0` or `>= V`: off);
   top-p keeps the shortest prefix of the sorted, top-k-masked distribution whose mass
   reaches `top_p` (a token is kept iff the mass strictly before it is `< top_p`;
   `top_p >= 1`: off). Both act as a value threshold, so tokens tied with the last kept
   value are kept too (deterministic, independent of sort tie order).
7. **sample** -- Gumbel-max: `argmax(x + Gumbel noise)` with the row's own key
   `fold_in(PRNGKey(seed), position)`, so a row's token depends only on its logits, its
   parameters, its seed and its position -- never on the other rows or the batch size.

Masked tokens become `-inf`; the max kept token is never masked, and a row with every
logit `-inf` returns token 0 (never NaN, never out of range).

The static switches (`SamplerVariant`'s fields) pick cheaper compiled variants; rows that do
not use a feature get bit-identical results from the cheap and the full variant:
`use_top_k_top_p=False` skips the vocab sort (every row must have top_k off, top_p 1),
`use_penalties=False` skips the penalty gather/scatter (every row neutral),
`all_greedy=True` skips the random-number generation (every row greedy).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxengine.sample.grammar_mask import apply_token_bitmask
from jaxengine.sample.metadata import SAMPLING_EPS, SamplingTensors

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, chosen token under log_softmax(raw logits)
    top_ids: jax.Array  # [S, K] i32
    top_logprobs: jax.Array  # [S, K] f32


def _row_index(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None], ids.shape)


def apply_logit_bias(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """`logits[r, id] += value` for every valid (id >= 0) pair; duplicate ids add up. logits [S, V]."""
    V = logits.shape[-1]
    ids = t.logit_bias_ids.astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < V), ids, V)  # out of range -> dropped
    return logits.at[_row_index(ids), ids].add(t.logit_bias_values.astype(logits.dtype), mode="drop")


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM repetition / frequency / presence penalties, without any [S, V] count array.

    Sorts each row's (id, is_output) pairs ([S, L], small) so the output count of every id is two
    binary searches; then every slot writes the same penalised value for its id (duplicates
    write identical values, so the scatter is deterministic). Rows with neutral penalties
    write nothing.
    """
    S, V = logits.shape
    ids = t.penalty_token_ids.astype(jnp.int32)
    rep = t.repetition_penalty.astype(logits.dtype)
    pres = t.presence_penalty.astype(logits.dtype)
    freq = t.frequency_penalty.astype(logits.dtype)
    row_uses = (rep != 1.0) | (pres != 0.0) | (freq != 0.0)
    valid = (ids >= 0) & (ids < V) & row_uses[:, None]
    # composite key: outputs (0) and prompt (1) occurrences of id; invalid slots sort last.
    key = jnp.where(valid, ids * 2 + jnp.where(t.penalty_is_output, 0, 1), jnp.iinfo(jnp.int32).max)
    key_sorted = jnp.sort(key, axis=-1)
    search = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))
    n_out = search(key_sorted, ids * 2 + 1) - search(key_sorted, ids * 2)  # [S, L] output count of id
    gid = jnp.where(valid, ids, 0)
    x = jnp.take_along_axis(logits, gid, axis=-1)
    x = jnp.where(x > 0, x / rep[:, None], x * rep[:, None])
    x = x - freq[:, None] * n_out.astype(x.dtype) - pres[:, None] * (n_out > 0).astype(x.dtype)
    sid = jnp.where(valid, ids, V)
    return logits.at[_row_index(sid), sid].set(x, mode="drop")


def apply_penalties_and_bias(logits: jax.Array, t: SamplingTensors, *, use_penalties: bool = True) -> jax.Array:
    """Steps 2-3 on logits [S, V]: logit bias (incl. min_tokens suppression), then penalties.
    The greedy argmax is taken on this."""
    logits = apply_logit_bias(logits, t)
    if use_penalties:
        logits = apply_penalties(logits, t)
    return logits


def apply_min_p(x: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens with prob < min_p * max_prob (log space; min_p 0 keeps everything). x [S, V], min_p [S]."""
    m = jnp.max(x, axis=-1, keepdims=True)
    thr = m + jnp.log(min_p.astype(x.dtype))[:, None]
    return jnp.where(x < thr, _NEG_INF, x)


def apply_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p with one descending sort per row; applied as a value threshold.
    x [S, V], top_k [S], top_p [S]."""
    V = x.shape[-1]
    s = jnp.sort(x, axis=-1, descending=True)
    k_on = (top_k > 0) & (top_k < V)
    k = jnp.where(k_on, top_k, V).astype(jnp.int32)
    kth = jnp.take_along_axis(s, (k - 1)[:, None], axis=-1)  # [S, 1]
    kth = jnp.where(k_on[:, None], kth, _NEG_INF)
    s_k = jnp.where(s >= kth, s, _NEG_INF)
    m = s[:, :1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s_k - m)
    c = jnp.cumsum(e, axis=-1)
    keep = (c - e) < top_p[:, None].astype(x.dtype) * c[:, -1:]  # mass strictly before < p
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, dtype=jnp.int32), 1)
    pth = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
    pth = jnp.where((top_p < 1.0)[:, None], pth, _NEG_INF)
    thr = jnp.maximum(kth, pth)
    return jnp.where(x < thr, _NEG_INF, x)


def _row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:  # seeds [S] or [S, 2], positions [S]
    seeds = seeds.astype(jnp.uint32)
    if seeds.ndim == 1:
        data = jnp.stack([jnp.zeros_like(seeds), seeds], axis=-1)
    else:
        data = seeds
    keys = jax.random.wrap_key_data(data, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(keys, positions.astype(jnp.uint32))


def gumbel_noise(seeds: jax.Array, positions: jax.Array, V: int, dtype=jnp.float32) -> jax.Array:
    """[S, V] Gumbel noise; row r depends only on (seeds[r], positions[r], V). seeds [S] or
    [S, 2] (SamplingTensors.seeds), positions [S]."""
    keys = _row_keys(seeds, positions)
    return jax.vmap(lambda k: jax.random.gumbel(k, (V,), dtype))(keys)


def compute_logprobs(
    logits: jax.Array, token_ids: jax.Array, num_logprobs: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:  # [N], [N, K] i32, [N, K]
    """log_softmax(logits) ([N, V]) at `token_ids` ([N]) and its top-`num_logprobs` (ids, values).

    Usable for prompt_logprobs too (any [N, V] rows). Never NaN: a row of all -inf gives -inf.
    """
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    shifted = logits - m
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    lp = jnp.take_along_axis(shifted, token_ids[:, None].astype(jnp.int32), axis=-1) - lse
    lp = jnp.where(jnp.isnan(lp), _NEG_INF, lp)[:, 0]
    if num_logprobs > 0:
        top_vals, top_ids = jax.lax.top_k(shifted, num_logprobs)
        top_lp = top_vals - lse
        top_lp = jnp.where(jnp.isnan(top_lp), _NEG_INF, top_lp)
    else:
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
        top_lp = jnp.zeros((logits.shape[0], 0), logits.dtype)
    return lp, top_ids.astype(jnp.int32), top_lp


def sample(
    logits: jax.Array,
    t: SamplingTensors,
    *,
    num_logprobs: int = 0,
    use_top_k_top_p: bool = True,
    use_penalties: bool = True,
    all_greedy: bool = False,
    token_bitmask: jax.Array | None = None,
) -> SamplerOutput:
    """Sample one token per row of `logits` [S, V] (see the module docstring for order and semantics).

    Keyword arguments but `token_bitmask` are static (pick the compiled variant); `num_logprobs`
    must be <= V. `token_bitmask` [S, ceil(V/32)] int32: the rows' allowed tokens (None: all).
    """
    S, V = logits.shape
    logits = logits.astype(jnp.float32)
    x = apply_penalties_and_bias(logits, t, use_penalties=use_penalties)
    if token_bitmask is not None:
        x = apply_token_bitmask(x, token_bitmask)
    temp = t.temperature.astype(jnp.float32)
    greedy = temp < SAMPLING_EPS
    if all_greedy:
        tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    else:
        x = x / jnp.where(greedy, 1.0, temp)[:, None]
        x = apply_min_p(x, t.min_p)
        if use_top_k_top_p:
            x = apply_top_k_top_p(x, t.top_k, t.top_p)
        g = gumbel_noise(t.seeds, t.positions, V, x.dtype)
        x = x + jnp.where(greedy[:, None], 0.0, g)
        tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    lp, top_ids, top_lp = compute_logprobs(logits, tok, num_logprobs)
    return SamplerOutput(token_ids=tok, logprobs=lp, top_ids=top_ids, top_logprobs=top_lp)


__all__ = [
    "SamplerOutput",
    "sample",
    "apply_logit_bias",
    "apply_penalties",
    "apply_penalties_and_bias",
    "apply_min_p",
    "apply_top_k_top_p",
    "compute_logprobs",
    "gumbel_noise",
]
