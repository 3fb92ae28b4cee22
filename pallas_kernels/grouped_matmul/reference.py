"""Pure-jnp grouped matmul over rows sorted by group: the reference a Pallas kernel will be
checked against, and today the path on every backend (`grouped_matmul.grouped_matmul`).

Rows of `lhs` are sorted by group (expert): group g owns rows [starts[g], ends[g]) with
ends = cumsum(group_sizes); rows past sum(group_sizes) are padding and come out as zeros.
Row r of group g computes lhs[r] @ rhs[g].T, rhs in the checkpoint's [out, in] layout.

The rows are cut into tiles of `block_m`; a work item is one (tile, group) pair whose
group has rows in that tile, so each item is one [block_m, K] x [K, N] matmul against one
group's weights, with rows of other groups masked out. Consecutive groups share at most one
boundary tile, so there are at most num_tiles + min(G, M) - 1 items and only the groups that
own rows are read. (`jax.lax.ragged_dot` is not used: off TPU, jax lowers it through a dense
[G, M, K] masked expansion, every group on every row.) The items run in a while loop whose
trip count is the real number of items, so padding items cost nothing. `GroupTiles` is the
metadata a kernel grid would read through scalar prefetch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupTiles(NamedTuple):
    """The (tile, group) work items of a sorted row batch."""

    tile: jax.Array  # [W] int32: the row tile of item w (W: the static bound)
    group: jax.Array  # [W] int32: its group
    num_items: jax.Array  # [] int32: items [0, num_items) are real, the rest padding
    starts: jax.Array  # [G] int32: first row of each group
    ends: jax.Array  # [G] int32: one past its last row


def max_items(num_rows: int, num_groups: int, block_m: int) -> int:
    """The static bound on work items: num_tiles + min(G, M) - 1."""
    num_tiles = -(-num_rows // block_m)
    return max(1, num_tiles + min(num_groups, num_rows) - 1)


def group_tiles(group_sizes: jax.Array, num_rows: int, block_m: int) -> GroupTiles:  # group_sizes [G] int32
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first, last = starts // block_m, (ends - 1) // block_m
    count = jnp.where(sizes > 0, last - first + 1, 0)  # tiles each group touches
    item_end = jnp.cumsum(count)
    w = jnp.arange(max_items(num_rows, g, block_m), dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(item_end, w, side="right"), g - 1).astype(jnp.int32)
    tile = first[group] + w - (item_end[group] - count[group])
    num_items = item_end[-1]
    tile = jnp.where(w < num_items, tile, 0).astype(jnp.int32)
    return GroupTiles(tile, group, num_items.astype(jnp.int32), starts, ends)


def grouped_matmul_reference(
    lhs: jax.Array,  # [M, K], rows sorted by group
    rhs: jax.Array,  # [G, N, K]
    group_sizes: jax.Array,  # [G] int32, sum <= M
    *,
    block_m: int,
) -> jax.Array:  # [M, N] in lhs.dtype, accumulated in float32
    m, k = lhs.shape
    num_tiles = -(-m // block_m)
    padded = jnp.pad(lhs, ((0, num_tiles * block_m - m), (0, 0)))
    items = group_tiles(group_sizes, m, block_m)
    rows_in_tile = jnp.arange(block_m, dtype=jnp.int32)

    def item(w, out):  # out [num_tiles * block_m, N]
        tile, grp = items.tile[w], items.group[w]
        row0 = tile * block_m
        x = jax.lax.dynamic_slice_in_dim(padded, row0, block_m)  # [block_m, K]
        wt = jax.lax.dynamic_index_in_dim(rhs, grp, keepdims=False)  # [N, K]
        y = jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
        rows = row0 + rows_in_tile
        mine = (rows >= items.starts[grp]) & (rows < items.ends[grp])
        current = jax.lax.dynamic_slice_in_dim(out, row0, block_m)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], y.astype(out.dtype), current), row0, 0)

    out = jnp.zeros((num_tiles * block_m, rhs.shape[1]), lhs.dtype)
    return jax.lax.fori_loop(0, items.num_items, item, out)[:m]
