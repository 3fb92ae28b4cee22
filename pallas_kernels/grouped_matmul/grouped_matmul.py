"""`grouped_matmul`: the public entry of the grouped (per-expert) matmul, where its
arguments are checked, its block size chosen and its body picked.

Bodies (`body`): "reference" (`reference.grouped_matmul_reference`, the default on every
backend): the tiled (tile, group) loop that reads only the groups owning rows; "triton"
(`triton.grouped_matmul_triton`): the same work items as a Pallas kernel, checked in
interpret mode, not yet measured on a GPU, hence not the default. Both take the same
`GroupTiles` metadata; the model never chooses.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.triton import grouped_matmul_triton

MAX_BLOCK_M = 128
BODIES = ("reference", "triton")


def default_block_m(num_rows: int) -> int:
    """Rows per tile: the next power of two of the rows (>= 8), at most MAX_BLOCK_M, so a
    decode step's few routed rows are not padded to a full tile."""
    return min(MAX_BLOCK_M, max(8, 1 << max(0, num_rows - 1).bit_length()))


def _divisor_block(dim: int, most: int = 64) -> int:
    """The largest power of two <= `most` that divides `dim`."""
    b = most
    while dim % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "body", "interpret"))
def grouped_matmul(
    lhs: jax.Array,  # [M, K], rows sorted by group
    rhs: jax.Array,  # [G, N, K]: each group's weight as [out, in]
    group_sizes: jax.Array,  # [G] int32, sum <= M; rows past the sum come out as zeros
    *,
    block_m: int | None = None,
    block_n: int | None = None,  # the "triton" body's column and depth blocks (divisors of N and K)
    block_k: int | None = None,
    body: str = "reference",
    interpret: bool = False,  # the "triton" body in the HLO interpreter (CPU)
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
    if body not in BODIES:
        raise ValueError(f"body must be one of {', '.join(BODIES)}, got {body!r}")
    if body == "reference":
        return grouped_matmul_reference(lhs, rhs.astype(lhs.dtype), group_sizes, block_m=block_m)
    n, k = rhs.shape[1], rhs.shape[2]
    block_n = _divisor_block(n) if block_n is None else block_n
    block_k = _divisor_block(k) if block_k is None else block_k
    for name, block, dim, what in (("block_n", block_n, n, "N"), ("block_k", block_k, k, "K")):
        if not isinstance(block, int) or block < 1 or dim % block:
            raise ValueError(f"{name} must divide {what} = {dim}, got {block!r}")
    return grouped_matmul_triton(lhs, rhs, group_sizes, block_m=block_m, block_n=block_n, block_k=block_k,
                                 interpret=interpret)
