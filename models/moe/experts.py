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
from models.sharding import shard_experts
from pallas_kernels.grouped_matmul import grouped_matmul


def swiglu_experts(
    rows: jax.Array,  # [M, H], sorted by expert
    group_sizes: jax.Array,  # [E] int32; rows past their sum are padding
    gate_up: jax.Array,  # [E, I, 2, H]
    down: jax.Array,  # [E, H, I]
) -> jax.Array:  # [M, H], zeros on padding rows
    e, i, _, h = gate_up.shape
    # Merging [I, 2] keeps each gate row beside its up row, so a tp shard of I stays whole.
    gu = grouped_matmul(rows, gate_up.reshape(e, i * 2, h), group_sizes).reshape(-1, i, 2)
    return grouped_matmul(jax.nn.silu(gu[..., 0]) * gu[..., 1], down, group_sizes)


class Experts(nnx.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.gate_up_proj = nnx.Param(normal_init(rngs, (num_experts, hidden, 2, dim), param_dtype))
        self.down_proj = nnx.Param(normal_init(rngs, (num_experts, dim, hidden), param_dtype))
        self.dtype = dtype

    def __call__(
        self,
        rows: jax.Array,  # [M, H], sorted by expert
        group_sizes: jax.Array,  # [E] int32; rows past their sum are padding
        mesh: jax.sharding.Mesh | None = None,
    ) -> jax.Array:  # [M, H], zeros on padding rows
        """With `mesh`, each `tp` shard runs its slice of every expert's intermediate and the
        partial outputs are summed (models.sharding.shard_experts), as the dense MLP's down_proj."""
        fn = swiglu_experts if mesh is None else shard_experts(swiglu_experts, mesh)
        return fn(rows.astype(self.dtype), group_sizes, self.gate_up_proj[...].astype(self.dtype),
                  self.down_proj[...].astype(self.dtype))
