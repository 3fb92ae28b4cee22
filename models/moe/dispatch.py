"""Tokens sorted by expert for the grouped GEMMs, and the way back: un-sort and the
router-weighted sum over each token's k experts."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.moe.router import Routing


class ExpertBatch(NamedTuple):
    """The step's (token, choice) assignments in expert order."""

    order: jax.Array  # [T * k] int32: flat assignment t * k + j at each sorted row
    group_sizes: jax.Array  # [E] int32: rows per expert; padding tokens' rows are in none (they sort last)


def sort_by_expert(routing: Routing, num_experts: int, num_tokens: jax.Array | None = None) -> ExpertBatch:
    """`num_tokens` ([] int32): the step's real tokens; the bucket's padding tokens after them
    are sent to no expert, so the grouped GEMMs skip their rows."""
    t, k = routing.experts.shape
    experts = routing.experts
    if num_tokens is not None:
        padding = jnp.arange(t, dtype=jnp.int32)[:, None] >= num_tokens
        experts = jnp.where(padding, num_experts, experts)  # a group past the last one
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[flat].add(1)[:num_experts]
    return ExpertBatch(order, group_sizes)


def gather_rows(x: jax.Array, batch: ExpertBatch, top_k: int) -> jax.Array:  # x [T, H] -> [T * k, H]
    return jnp.take(x, batch.order // top_k, axis=0)


def combine(y: jax.Array, batch: ExpertBatch, routing: Routing) -> jax.Array:  # y [T * k, H] sorted -> [T, H]
    """Un-sort the experts' outputs and add each token's k of them up, weighted."""
    t, k = routing.weights.shape
    unsorted = jnp.zeros_like(y).at[batch.order].set(y, unique_indices=True).reshape(t, k, -1)
    return jnp.sum(routing.weights.astype(y.dtype)[..., None] * unsorted, axis=1)
