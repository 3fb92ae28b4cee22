"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 by ModelConfig
switches) as Flax NNX modules. Attribute names mirror Hugging Face's parameter names, so the
flat state path of every parameter ("model.layers.0.self_attn.o_proj.weight") is its
checkpoint name, except the fused q/k/v and gate/up projections ("...self_attn.qkv_proj.weight"
stacks q_proj, k_proj and v_proj; models.loading.fused_weights maps them). A layer's
feed-forward is the dense MLP or, where ModelConfig.moe says so (Mixtral, Qwen2/3-MoE), the
mixture-of-experts block of models.moe.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.llama.attention import Attention, PagedAttentionFn, default_paged_attention
from models.attention_metadata import AttentionMetadata
from models.config import ModelConfig
from models.llama.layers import MLP, Dtype, Embedding, Linear, RMSNorm
from models.moe.sparse_moe_block import SparseMoeBlock
from models.quantization.scheme import QuantScheme
from models.sharding import replicated, sequence_split


def _unsplit(x: jax.Array) -> jax.Array:
    return x


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 quant: QuantScheme | None = None):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = (
            SparseMoeBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if cfg.is_moe_layer(layer)
            else MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        )

    def __call__(self, x, kv_cache, meta, attention_fn, mesh=None, split=_unsplit):
        """`split`: sequence parallelism's constraint on the residual stream (CausalLM)."""
        h, kv_cache = self.self_attn(self.input_layernorm(x), kv_cache, meta, attention_fn, mesh)
        x = x + split(h)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):  # the bucket's padding tokens go to no expert
            h = self.mlp(h, meta.cu_q_lens[meta.num_seqs.reshape(())], mesh)
        else:
            h = self.mlp(h)
        return x + split(h), kv_cache

    def dense(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn.dense(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 quant: QuantScheme | None = None):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
             for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)


class CausalLM(nnx.Module):
    """`__call__` runs one engine step over the ragged batch; `dense_logits` trains. `quant`
    (models.quantization): the decoder linears hold 8-bit weights; lm_head never does."""

    def __init__(
        self, cfg: ModelConfig, *, dtype: Dtype = jnp.float32, param_dtype: Dtype | None = None, rngs: nnx.Rngs,
        quant: QuantScheme | None = None,
    ):
        param_dtype = param_dtype or dtype
        self.config = cfg
        self.quant = quant
        self.model = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(
        self,
        tokens: jax.Array,  # [T] int32
        kv_caches: list[jax.Array],  # one per layer
        meta: AttentionMetadata,
        attention_fn: PagedAttentionFn | None = None,
        mesh: jax.sharding.Mesh | None = None,
        sequence_parallel: bool = False,
    ) -> tuple[jax.Array, list[jax.Array]]:  # hidden [T, hidden], updated caches
        """With `mesh` (parameters and caches sharded by models.sharding), attention runs per
        `tp` shard under shard_map; everything else is partitioned by XLA. `sequence_parallel`
        (with a mesh) keeps the residual stream split by token between the layers."""
        attention_fn = attention_fn or default_paged_attention()
        split = _unsplit
        if sequence_parallel and mesh is not None:
            split = sequence_split(mesh)
            # Only the residual stream is split: keep the batch's metadata (positions, slots,
            # rope) whole, or XLA spreads the split into it and gathers it back every layer.
            tokens, meta = jax.lax.with_sharding_constraint((tokens, meta), replicated(mesh))
        x = split(self.model.embed_tokens(tokens))
        new_caches = []
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, cache = layer(x, cache, meta, attention_fn, mesh, split)
            new_caches.append(cache)
        return self.model.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [..., hidden] -> [..., vocab] f32
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        w = w[...]
        return jnp.einsum("...i,vi->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def dense_logits(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, L, vocab] f32
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer.dense(x)
        return self.compute_logits(self.model.norm(x))
