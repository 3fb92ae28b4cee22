"""Which paged-attention function the model's layers run: chosen here alone, from EngineConfig."""

from __future__ import annotations

import functools

import jax

import pallas_kernels
from models.llama.attention import PagedAttentionFn


def attention_fn(use_pallas: bool | None, prefill_attention_body: str = "auto") -> PagedAttentionFn:
    """`use_pallas` None: the Pallas kernel on GPU, the jnp reference (XLA) elsewhere.
    `prefill_attention_body` (EngineConfig's): the kernel's body for prefill chunks, given to
    it as its static `prefill_body` ("auto": Mosaic GPU on Hopper where it applies, else Triton;
    see pallas_kernels.ragged_paged_attention)."""
    if use_pallas is None:
        use_pallas = jax.default_backend() == "gpu"
    if not use_pallas:
        return pallas_kernels.ragged_paged_attention_reference
    return functools.partial(pallas_kernels.ragged_paged_attention, prefill_body=prefill_attention_body)
