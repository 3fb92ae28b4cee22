"""`grouped_matmul`: the public entry of the grouped (per-expert) matmul, where its
arguments are checked, its block size chosen and its body picked.

Today every backend runs the jnp body (`reference.grouped_matmul_reference`): the tiled
(tile, group) loop that reads only the groups owning rows. A Pallas kernel (Mosaic GPU on
Hopper) drops in behind this function with the same arguments and the same `GroupTiles`
metadata; the model never chooses.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

MAX_BLOCK_M = 128


def default_block_m(num_rows: int) -> int:
    """Rows per tile: the next power of two of the rows (>= 8), at most MAX_BLOCK_M, so a
    decode step's few routed rows are not padded to a full tile."""
    return min(MAX_BLOCK_M, max(8, 1 << max(0, num_rows - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("block_m",))
def grouped_matmul(
    lhs: jax.Array,  # [M, K], rows sorted by group
    rhs: jax.Array,  # [G, N, K]: each group's weight as [out, in]
    group_sizes: jax.Array,  # [G] int32, sum <= M; rows past the sum come out as zeros
    *,
    block_m: int | None = None,
) -> jax.Array:  # [M, N] in lhs.dtype
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"grouped_matmul takes lhs [M, K] and rhs [G, N, K], got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[2]:
        raise ValueError(f"lhs has K = {lhs.shape[1]} but rhs [G, N, K] has K = {rhs.shape[2]}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer [G] = [{rhs.shape[0]}] array, got "
                         f"{group_sizes.dtype} {group_sizes.shape}")
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[1]), lhs.dtype)
    block_m = default_block_m(lhs.shape[0]) if block_m is None else block_m
    if not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 1, got {block_m!r}")
    return grouped_matmul_reference(lhs, rhs.astype(lhs.dtype), group_sizes, block_m=block_m)
