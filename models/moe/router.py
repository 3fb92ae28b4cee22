"""The router: which experts each token goes to, and with what weight."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    weights: jax.Array  # [T, k] float32: each chosen expert's weight
    experts: jax.Array  # [T, k] int32: the chosen experts, best first


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> Routing:  # logits [T, E]
    """Softmax over all experts (in float32, as the checkpoints' reference does), the top k,
    and with `norm_topk_prob` the k weights renormalised to sum to one (Mixtral always;
    Qwen-MoE as its config says)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32))
