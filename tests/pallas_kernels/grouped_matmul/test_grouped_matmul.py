"""The grouped matmul against a per-row numpy product (each row times its own group's
weight) and against jax.lax.ragged_dot, on uneven groups: empty groups, one group holding
every row, rows past the groups' sum (padding), row counts that are not a multiple of the tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import group_tiles, grouped_matmul
from pallas_kernels.grouped_matmul.reference import max_items

K, N, G = 24, 40, 6

CASES = {
    "uneven-with-empty": [5, 0, 17, 1, 0, 9],
    "one-group-all": [0, 0, 0, 32, 0, 0],
    "all-empty": [0] * G,
    "padding-rows": [3, 3, 0, 0, 2, 1],  # sums to 9 of 20 rows
    "single-rows": [1, 1, 1, 1, 1, 1],
}
ROWS = {"uneven-with-empty": 32, "one-group-all": 32, "all-empty": 7, "padding-rows": 20, "single-rows": 6}


def _want(lhs, rhs, sizes):
    group = np.repeat(np.arange(G), sizes)
    out = np.zeros((lhs.shape[0], rhs.shape[1]))
    out[: len(group)] = np.einsum("mk,mnk->mn", lhs[: len(group)].astype(np.float64), rhs[group].astype(np.float64))
    return out


@pytest.mark.parametrize("block_m", [None, 8, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_per_row_product(case, block_m):
    rng = np.random.default_rng(0)
    sizes, m = CASES[case], ROWS[case]
    lhs = rng.standard_normal((m, K)).astype(np.float32)
    rhs = rng.standard_normal((G, N, K)).astype(np.float32)
    got = np.asarray(grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32), block_m=block_m))
    np.testing.assert_allclose(got, _want(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    assert not got[sum(sizes):].any(), "rows past the groups' sum must be zeros"


def test_matches_ragged_dot():
    rng = np.random.default_rng(1)
    sizes = jnp.asarray([4, 0, 11, 0, 0, 17], jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((32, K)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((G, N, K)), jnp.float32)
    want = jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2), sizes, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(grouped_matmul(lhs, rhs, sizes, block_m=8), want, rtol=1e-5, atol=1e-5)


def test_work_items_visit_only_groups_that_own_rows():
    sizes = jnp.asarray([5, 0, 17, 1, 0, 9], jnp.int32)  # rows 0-4 | 5-21 | 22 | 23-31, tiles of 8
    items = group_tiles(sizes, 32, 8)
    n = int(items.num_items)
    pairs = list(zip(np.asarray(items.tile)[:n].tolist(), np.asarray(items.group)[:n].tolist()))
    assert pairs == [(0, 0), (0, 2), (1, 2), (2, 2), (2, 3), (2, 5), (3, 5)]
    assert n <= max_items(32, G, 8) == len(items.tile)


def test_bad_arguments_are_refused():
    lhs, rhs, sizes = jnp.zeros((8, K)), jnp.zeros((G, N, K)), jnp.zeros((G,), jnp.int32)
    with pytest.raises(ValueError, match="has K = "):
        grouped_matmul(lhs, jnp.zeros((G, N, K + 1)), sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(lhs, rhs, jnp.zeros((G + 1,), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul(lhs, rhs, sizes, block_m=12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_kernel_in_interpret_mode_matches_reference(case):
    """The Pallas kernel (HLO interpreter) against the jnp body on the same uneven groups,
    with N and K cut into several blocks so the column grid and the K loop both run."""
    rng = np.random.default_rng(2)
    sizes, m = jnp.asarray(CASES[case], jnp.int32), ROWS[case]
    lhs = jnp.asarray(rng.standard_normal((m, 32)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((G, 48, 32)), jnp.float32)
    want = grouped_matmul(lhs, rhs, sizes, block_m=8)
    got = grouped_matmul(lhs, rhs, sizes, block_m=8, block_n=16, block_k=8, body="triton", interpret=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[int(sizes.sum()):].any()


def test_triton_blocks_must_divide():
    lhs, rhs, sizes = jnp.zeros((8, 32)), jnp.zeros((G, 48, 32)), jnp.zeros((G,), jnp.int32)
    with pytest.raises(ValueError, match="block_n must divide N = 48"):
        grouped_matmul(lhs, rhs, sizes, block_n=32, body="triton", interpret=True)
    with pytest.raises(ValueError, match="body must be one of"):
        grouped_matmul(lhs, rhs, sizes, body="cuda")


def test_triton_kernel_cross_lowers_for_cuda():
    """The kernel at Qwen3-30B-A3B's gate/up shape lowers through Pallas' Triton lowering for
    CUDA on this CPU machine (no GPU compile or run: that needs a GPU)."""
    lhs = jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((128, 1536, 2048), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((128,), jnp.int32)
    fn = jax.jit(lambda a, b, c: grouped_matmul(a, b, c, block_m=64, block_n=64, block_k=64, body="triton"))
    text = fn.trace(lhs, rhs, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
