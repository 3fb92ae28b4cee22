"""Grammar masks on the device: a packed int32 token bitmask applied to the logits.

Row r allows token t iff bit `t % 32` of word `t // 32` of `bitmask[r]` is set (xgrammar's
layout, filled on the host by jaxengine.structured_output). Unconstrained rows of a constrained
batch are all ones, so their logits pass through unchanged; a batch with no constrained row runs
the sampler without this step at all (no mask uploaded, nothing computed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_token_bitmask(
    logits: jax.Array,  # [S, V] f32
    bitmask: jax.Array,  # [S, W] int32, W = ceil(V / 32)
) -> jax.Array:  # [S, V]: disallowed tokens -inf
    S, V = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(S, -1)[:, :V].astype(jnp.bool_)
    return jnp.where(allowed, logits, -jnp.inf)
