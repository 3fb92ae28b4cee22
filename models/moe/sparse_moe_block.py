"""The mixture-of-experts feed-forward of one layer (Mixtral, Qwen2-MoE, Qwen3-MoE): router,
tokens sorted by expert, grouped expert GEMMs, un-sort and weighted combine; Qwen2-MoE adds a
shared expert on every token behind a sigmoid gate. No expert runs on a token not routed to it.

Attribute names mirror transformers' (`mlp.gate`, `mlp.experts`, `mlp.shared_expert`,
`mlp.shared_expert_gate`), so flat parameter paths are checkpoint names.
"""

import jax
from flax import nnx

from models.config import ModelConfig
from models.llama.layers import MLP, Dtype, Linear
from models.moe.dispatch import combine, gather_rows, sort_by_expert
from models.moe.experts import Experts
from models.moe.router import route


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        moe = cfg.moe
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, moe.num_experts, bias=False, **kw)
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size, **kw)
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg.hidden_size, shared, bias=False, **kw) if shared else None
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False, **kw) if shared else None

    def __call__(
        self,
        x: jax.Array,  # [..., H]
        num_tokens: jax.Array | None = None,  # [] int32: real tokens of a flat [T, H] step, the rest padding
        mesh: jax.sharding.Mesh | None = None,
    ) -> jax.Array:  # [..., H]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = route(self.gate(x), self.top_k, self.norm_topk_prob)
        batch = sort_by_expert(routing, self.num_experts, num_tokens)
        out = combine(self.experts(gather_rows(x, batch, self.top_k), batch.group_sizes, mesh), batch, routing)
        if self.shared_expert is not None:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)
