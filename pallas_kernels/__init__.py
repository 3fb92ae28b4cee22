"""Attention kernels over the paged KV cache, each beside its pure-jnp reference."""

from pallas_kernels.kv_cache import init_kv_cache, write_kv
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.triton import ragged_paged_attention

__all__ = [
    "init_kv_cache",
    "write_kv",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
