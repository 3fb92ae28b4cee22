"""The grouped matmul as a Pallas kernel for NVIDIA GPUs (the Triton lowering), over the
same (tile, group) work items as the jnp reference (`reference.group_tiles`).

Grid: (work item, column block). Program (w, j) multiplies the rows of item w's tile by
columns j * block_n of its group's weight, looping over K in block_k steps with a float32
accumulator, and stores only the rows its group owns (masked store): the one or two other
groups of a boundary tile write theirs from their own programs. Programs past the real
number of items return at once, so only the groups that own rows are read. Rows past the
groups' sum are never written; the wrapper zeroes them.

Status: runs in the `interpret=True` HLO interpreter on CPU against the reference
(tests/pallas_kernels/grouped_matmul); not yet compiled or timed on a GPU, so
`grouped_matmul` keeps the jnp body by default until a GPU run measures this one (the
issue's target: >= 60% of a dense bf16 GEMM at 8k routed rows). Triton wants power-of-two
blocks of >= 16 rows/columns for its dot; the wrapper checks the divisibility.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grouped_matmul.reference import group_tiles


def _kernel(tile_ref, group_ref, num_items_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
            block_m: int, block_n: int, block_k: int):
    w, j = pl.program_id(0), pl.program_id(1)

    @pl.when(w < num_items_ref[0])
    def _():
        g = group_ref[w]
        row0 = tile_ref[w] * block_m
        col0 = j * block_n
        precision = jax.lax.Precision.HIGHEST if lhs_ref.dtype == jnp.float32 else None

        def step(kb, acc):
            x = lhs_ref[pl.ds(row0, block_m), pl.ds(kb * block_k, block_k)]
            wt = rhs_ref[g, pl.ds(col0, block_n), pl.ds(kb * block_k, block_k)]
            return acc + jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, lhs_ref.shape[1] // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
        rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        pltriton.store(out_ref.at[pl.ds(row0, block_m), pl.ds(col0, block_n)], acc.astype(out_ref.dtype),
                       mask=mine[:, None])


def grouped_matmul_triton(
    lhs: jax.Array,  # [M, K], rows sorted by group
    rhs: jax.Array,  # [G, N, K]
    group_sizes: jax.Array,  # [G] int32
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:  # [M, N] in lhs.dtype
    m, k = lhs.shape
    n = rhs.shape[1]
    num_tiles = -(-m // block_m)
    padded = jnp.pad(lhs, ((0, num_tiles * block_m - m), (0, 0)))
    items = group_tiles(group_sizes, m, block_m)
    metadata = (items.tile, items.group, items.num_items.reshape(1), items.starts, items.ends)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    out = pl.pallas_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k),
        grid=(items.tile.shape[0], n // block_n),
        in_specs=[whole(x) for x in (*metadata, padded, rhs)],
        out_specs=pl.BlockSpec((num_tiles * block_m, n), lambda *_: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_tiles * block_m, n), lhs.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(*metadata, padded, rhs.astype(lhs.dtype))
    rows = jnp.arange(num_tiles * block_m, dtype=jnp.int32)[:, None]
    return jnp.where(rows < items.ends[-1], out, jnp.zeros_like(out))[:m]
