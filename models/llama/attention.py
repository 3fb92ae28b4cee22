"""Self-attention over the paged KV cache (serving) or plain causal attention (training).

Serving path: x is the flat ragged batch [T, hidden]; the step's K/V are written into
this layer's cache at `meta.slot_mapping` and attention reads the cache through the block
tables. The cache layout belongs to `pallas_kernels`; this module only passes it through.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from models.attention_metadata import AttentionMetadata
from models.config import ModelConfig
from models.llama.layers import Dtype, RMSNorm, linear
from models.quantization.scheme import QuantScheme
from models.llama.rope import apply_rope, inverse_frequencies
from models.sharding import shard_heads

# Signature of pallas_kernels.ragged_paged_attention(_reference).
PagedAttentionFn = Callable[..., jax.Array]


def default_paged_attention() -> PagedAttentionFn:
    """The Pallas kernel on NVIDIA GPUs, the jnp reference (XLA) everywhere else."""
    kernel = getattr(pallas_kernels, "ragged_paged_attention", None)
    if kernel is not None and jax.default_backend() == "gpu":
        return kernel
    return pallas_kernels.ragged_paged_attention_reference


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 quant: QuantScheme | None = None):
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        # q, k and v as one matmul (models.loading.fused_weights): per KV head, its G query heads, k, v.
        self.qkv_proj = linear(h, (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads + 2, d), bias=cfg.qkv_bias, **kw)
        self.o_proj = linear(cfg.num_heads * d, h, bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.sliding_window = cfg.sliding_windows[layer]

    def _qkv(self, x: jax.Array, positions: jax.Array):
        cfg = self.cfg
        g = cfg.num_heads // cfg.num_kv_heads
        qkv = self.qkv_proj(x)  # [..., Hkv, G + 2, D]
        q = qkv[..., :g, :].reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)  # head h uses KV head h // G
        k, v = qkv[..., g, :], qkv[..., g + 1, :]  # [..., Hkv, D]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def __call__(
        self,
        x: jax.Array,  # [T, hidden]
        kv_cache: jax.Array,  # one layer's paged cache (layout: pallas_kernels.kv_cache)
        meta: AttentionMetadata,
        attention_fn: PagedAttentionFn,
        mesh: jax.sharding.Mesh | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        q, k, v = self._qkv(x, meta.positions)
        sm_scale, window = self.cfg.sm_scale, self.sliding_window

        def write_and_attend(q, k, v, kv_cache, meta):
            kv_cache = pallas_kernels.write_kv(kv_cache, k, v, meta.slot_mapping)
            out = attention_fn(
                q, kv_cache, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs,
                sm_scale=sm_scale, sliding_window=window,
            )
            return out, kv_cache

        if mesh is not None:  # tensor parallel: the write and the kernel run per shard of heads
            write_and_attend = shard_heads(write_and_attend, mesh)
        out, kv_cache = write_and_attend(q, k, v, kv_cache, meta)
        return self.o_proj(out.reshape(x.shape[0], -1)), kv_cache

    def dense(self, x: jax.Array) -> jax.Array:  # [B, L, hidden] -> [B, L, hidden]
        """Causal attention over whole sequences at positions 0..L-1 (training, no cache)."""
        b, length, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        q, k, v = self._qkv(x, positions)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        out = jax.nn.dot_product_attention(
            q, k, v, scale=self.cfg.sm_scale, is_causal=True, local_window_size=window
        )
        return self.o_proj(out.reshape(b, length, -1))
