"""The jnp reference against a per-sequence float64 numpy loop, and the KV-cache write."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import init_kv_cache, ragged_paged_attention_reference, write_kv
from tests.pallas_kernels.ragged_paged_attention.paged_attention_inputs import make_case, naive_attention, rel_err

CASES = {
    "decode": ([1, 1, 1, 1], [1, 15, 16, 17]),
    "prefill": ([1, 15, 16, 17], [1, 15, 16, 17]),
    "mixed": ([1, 7, 20, 1, 3], [33, 7, 48, 1, 31]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("group", [1, 4, 8])
def test_reference_matches_naive_loop(name, group):
    q_lens, kv_lens = CASES[name]
    case = make_case(q_lens, kv_lens, num_q_heads=2 * group, num_kv_heads=2, head_dim=32,
                     page_size=16, pad_tokens=3, pad_seqs=2, seed=group)
    scale = 32**-0.5
    out = np.asarray(ragged_paged_attention_reference(*case.args(), sm_scale=scale))
    ref = naive_attention(case, sm_scale=scale)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5
    assert not out[case.cu_q_lens[case.num_seqs[0]] :].any()  # padding rows are zeros


@pytest.mark.parametrize("window,cap", [(5, None), (None, 2.0), (17, 5.0)])
def test_reference_window_and_soft_cap(window, cap):
    case = make_case([1, 9, 24], [40, 9, 35], num_q_heads=8, num_kv_heads=2, head_dim=32,
                     page_size=8, poison=1e30, seed=7)
    scale = 0.3
    out = np.asarray(ragged_paged_attention_reference(
        *case.args(), sm_scale=scale, sliding_window=window, soft_cap=cap))
    ref = naive_attention(case, sm_scale=scale, sliding_window=window, soft_cap=cap)
    assert rel_err(out, ref) < 1e-5


def test_reference_no_sequences_is_zeros():
    case = make_case([3, 1], [5, 9], pad_tokens=2, pad_seqs=1)
    case.num_seqs[:] = 0
    out = np.asarray(ragged_paged_attention_reference(*case.args(), sm_scale=0.1))
    assert np.isfinite(out).all() and not out.any()


def test_init_kv_cache_layout():
    c = init_kv_cache(num_pages=5, page_size=16, num_kv_heads=2, head_dim=64)
    assert c.shape == (2, 2, 5, 16, 64) and c.dtype == jnp.bfloat16 and not c.any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_puts_each_token_at_its_slot(dtype):
    rng = np.random.default_rng(0)
    hkv, num_pages, page_size, d, t = 2, 6, 4, 8, 7
    cache = jnp.asarray(rng.standard_normal((2, hkv, num_pages, page_size, d)), dtype)
    k = rng.standard_normal((t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((t, hkv, d)).astype(np.float32)
    slots = np.array([5, 6, 7, 8, 21, 0, 1], np.int32)  # last two: padding -> null page
    new = np.asarray(jax.jit(write_kv, donate_argnums=0)(
        jnp.array(cache), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots)), np.float32)
    expect = np.asarray(cache, np.float32).copy()
    for i, sl in enumerate(slots):
        pg, off = divmod(int(sl), page_size)
        expect[0, :, pg, off] = np.asarray(jnp.asarray(k[i], dtype), np.float32)
        expect[1, :, pg, off] = np.asarray(jnp.asarray(v[i], dtype), np.float32)
    np.testing.assert_array_equal(new, expect)


def test_write_kv_then_attend_sees_new_tokens():
    """A decode step: write the new token's K/V, then attention over kv_len including it."""
    case = make_case([1], [9], num_q_heads=2, num_kv_heads=2, head_dim=16, page_size=4)
    page, off = case.page_indices[0, 2], 0  # position 8 = page slot 2, offset 0
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 16)).astype(np.float32)
    cache = write_kv(jnp.asarray(case.kv_cache), jnp.asarray(k), jnp.asarray(v),
                     jnp.asarray([page * 4 + off], jnp.int32))
    case.kv_cache = np.asarray(cache)
    out = np.asarray(ragged_paged_attention_reference(*case.args(), sm_scale=0.25))
    assert rel_err(out, naive_attention(case, sm_scale=0.25)) < 1e-5
