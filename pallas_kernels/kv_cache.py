"""The paged KV cache: its layout, allocation and the write of a step's new K/V.

Layout (the one place it is written down; models and the runner only pass it through):

    kv_cache: [2, num_kv_heads, num_pages, page_size, head_dim]   one array per layer
               ^ 0 = keys, 1 = values

One (kv head, page) tile is contiguous (`page_size * head_dim` elements), so an attention
kernel program that owns one KV head streams whole pages with wide, coalesced loads.
Page 0 is the null page: the block pool never hands it out, padding tokens write there
and padded block-table entries point there, so it is never read as real context.

A token's slot is `page * page_size + offset`; `slot_mapping[T]` gives each new token's
slot (padding tokens use slot 0..page_size-1 of the null page).
"""

import jax
import jax.numpy as jnp


def init_kv_cache(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype=jnp.bfloat16
) -> jax.Array:
    """Zeros for one layer: [2, num_kv_heads, num_pages, page_size, head_dim]."""
    return jnp.zeros((2, num_kv_heads, num_pages, page_size, head_dim), dtype)


def write_kv(
    kv_cache: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    slot_mapping: jax.Array,  # [T] int32
) -> jax.Array:
    """Scatter the step's new K/V into their slots (XLA scatter; in place when donated)."""
    _, hkv, num_pages, page_size, d = kv_cache.shape
    flat = kv_cache.reshape(2, hkv, num_pages * page_size, d)
    new = jnp.stack([k, v]).astype(kv_cache.dtype)  # [2, T, Hkv, D]
    flat = flat.at[:, :, slot_mapping, :].set(new.transpose(0, 2, 1, 3), mode="drop")
    return flat.reshape(kv_cache.shape)
