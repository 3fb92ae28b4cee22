"""The routed experts of one MoE layer: a SwiGLU per expert, computed by two grouped GEMMs
over the rows sorted by expert (`pallas_kernels.grouped_matmul`).

Parameters (the flat names are the transformers-5 in-memory names; models.loading.expert_weights
reads the per-expert checkpoint layouts into them):

    experts.gate_up_proj  [E, I, 2, H]   per expert and intermediate row: gate, then up
                                         (the dense MLP's [I, 2, H] with an expert axis in front)
    experts.down_proj     [E, H, I]
"""

import jax
from flax import nnx

from models.llama.layers import Dtype, normal_init
from pallas_kernels.grouped_matmul import grouped_matmul


class Experts(nnx.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.gate_up_proj = nnx.Param(normal_init(rngs, (num_experts, hidden, 2, dim), param_dtype))
        self.down_proj = nnx.Param(normal_init(rngs, (num_experts, dim, hidden), param_dtype))
        self.dtype = dtype

    def __call__(
        self,
        rows: jax.Array,  # [M, H], sorted by expert
        group_sizes: jax.Array,  # [E] int32; rows past their sum are padding
    ) -> jax.Array:  # [M, H], zeros on padding rows
        gate_up = self.gate_up_proj[...].astype(self.dtype)
        e, i, _, h = gate_up.shape
        x = rows.astype(self.dtype)
        # Merging [I, 2] keeps each gate row beside its up row, so a tp shard of I stays whole.
        gu = grouped_matmul(x, gate_up.reshape(e, i * 2, h), group_sizes).reshape(-1, i, 2)
        act = jax.nn.silu(gu[..., 0]) * gu[..., 1]
        return grouped_matmul(act, self.down_proj[...].astype(self.dtype), group_sizes)
