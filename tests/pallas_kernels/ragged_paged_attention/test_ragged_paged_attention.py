"""The Pallas kernel in interpret mode (CPU) against the jnp reference, on random ragged
batches with permuted page tables and poisoned unused pages; and on the GPU when present."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from tests.pallas_kernels.ragged_paged_attention.paged_attention_inputs import make_case, naive_attention, rel_err

# Relative error (||out - ref|| / ||ref||) allowed per input dtype. fp32 must be exact up
# to accumulation order; bf16/fp16 kernels cast the softmax weights to the input dtype
# before the PV product (as every flash kernel does), the reference does not.
TOL = {np.float32: 1e-5, jnp.bfloat16: 1.5e-2, np.float16: 3e-3}

# (q_lens, kv_lens) of the live sequences, page size 16.
DECODE = ([1] * 6, [1, 15, 16, 17, 33, 64])
PREFILL = ([1, 15, 16, 17, 40], [1, 15, 16, 17, 40])
MIXED = ([1, 7, 20, 1, 9, 3], [33, 7, 48, 1, 31, 3])


def run(case, *, interpret=True, **kw):
    kw.setdefault("sm_scale", case.q.shape[-1] ** -0.5)
    args = [jnp.asarray(a) for a in case.args()]
    ref = ragged_paged_attention_reference(
        *args, **{k: kw[k] for k in ("sm_scale", "sliding_window", "soft_cap") if k in kw})
    out = ragged_paged_attention(*args, interpret=interpret, **kw)
    return np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))


def check(case, dtype=np.float32, **kw):
    out, ref = run(case, **kw)
    assert np.isfinite(out).all(), "NaN/inf leaked into the output"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} >= {TOL[dtype]:.0e}"
    live = case.cu_q_lens[case.num_seqs[0]]
    assert not out[live:].any(), "padding rows must come out as zeros"


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("batch", ["decode", "prefill", "mixed"])
def test_batches_and_gqa_groups(batch, group):
    q_lens, kv_lens = {"decode": DECODE, "prefill": PREFILL, "mixed": MIXED}[batch]
    case = make_case(q_lens, kv_lens, num_q_heads=2 * group, num_kv_heads=2,
                     pad_tokens=5, pad_seqs=2, seed=group)
    check(case)


@pytest.mark.parametrize("poison", [np.nan, 1e30, -np.inf])
def test_unused_pages_never_leak(poison):
    case = make_case(*MIXED, num_q_heads=8, num_kv_heads=2, poison=poison, extra_pages=9,
                     seed=3)
    check(case)


@pytest.mark.parametrize(
    "kw",
    [dict(sliding_window=8), dict(sliding_window=20, soft_cap=3.0, pages_per_block=1), dict(soft_cap=2.0)],
    ids=["window8", "window20_cap3", "cap2"],
)
def test_sliding_window_and_soft_cap(kw):
    case = make_case(*MIXED, num_q_heads=8, num_kv_heads=2, pad_tokens=2, seed=4)
    check(case, **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_low_precision_inputs(dtype):
    case = make_case(*MIXED, num_q_heads=8, num_kv_heads=2, dtype=dtype, pad_tokens=3,
                     seed=5)
    check(case, dtype=dtype)


@pytest.mark.parametrize(
    "kw",
    [dict(num_kv_splits=3), dict(block_q=3), dict(block_q=1, pages_per_block=1),
     dict(block_q=8, pages_per_block=4, num_kv_splits=2),
     dict(pages_per_block=1, unmasked_interior=True, num_kv_splits=2),
     dict(pages_per_block=1, unmasked_interior=False)],
    ids=["splits3", "block_q3", "bq1_ppb1", "bq8_ppb4_splits2", "two_loops", "one_loop"],
)
def test_block_sizes_do_not_change_the_result(kw):
    case = make_case(*MIXED, num_q_heads=8, num_kv_heads=2, pad_tokens=4, pad_seqs=1,
                     seed=6)
    check(case, **kw)


@pytest.mark.parametrize("head_dim,page_size", [(128, 32), (256, 16), (64, 64)])
def test_head_dims_and_page_sizes(head_dim, page_size):
    case = make_case([1, 5, 1], [70, 5, page_size + 1], num_q_heads=4, num_kv_heads=1,
                     head_dim=head_dim, page_size=page_size, seed=head_dim)
    check(case)


def test_kernel_matches_naive_loop_directly():
    case = make_case([1, 12, 1], [17, 12, 32], num_q_heads=4, num_kv_heads=2, seed=8)
    out, _ = run(case, sliding_window=9)
    assert rel_err(out, naive_attention(case, sm_scale=64**-0.5, sliding_window=9)) < 1e-5


def test_no_live_sequences_gives_zeros():
    case = make_case([2, 1], [9, 4], pad_tokens=3, pad_seqs=2, seed=9)
    case.num_seqs[:] = 0
    out, _ = run(case)
    assert np.isfinite(out).all() and not out.any()


@pytest.mark.parametrize(
    "kw,match",
    [(dict(block_q=0), "block_q"), (dict(pages_per_block=3), "pages_per_block"),
     (dict(pages_per_block=0), "pages_per_block"), (dict(num_kv_splits=0), "num_kv_splits"),
     (dict(num_warps=3), "num_warps"), (dict(num_stages=0), "num_stages")],
)
def test_bad_block_sizes_raise(kw, match):
    case = make_case([1], [4], page_size=8)
    with pytest.raises(ValueError, match=match):
        run(case, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [(dict(num_q_heads=3, num_kv_heads=2), "multiple"), (dict(head_dim=48), "head_dim"),
     (dict(page_size=12), "page_size")],
)
def test_bad_shapes_raise(kw, match):
    case = make_case([1], [4], **kw)
    args = [jnp.asarray(a) for a in case.args()]
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, sm_scale=0.1, interpret=True)


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float32])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_gpu_kernel_matches_reference(batch, dtype):
    q_lens, kv_lens = {"decode": DECODE, "mixed": MIXED}[batch]
    case = make_case(q_lens, kv_lens, num_q_heads=32, num_kv_heads=8, head_dim=128,
                     dtype=dtype, pad_tokens=5, pad_seqs=2, seed=11)
    check(case, dtype=dtype, interpret=False)


@pytest.mark.parametrize("kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "unknown"])
@pytest.mark.parametrize("num_tokens,head_dim", [(8192, 128), (256, 128), (8192, 256), (8192, 64)])
def test_default_blocks_fit_shared_memory_in_every_dtype(kind, num_tokens, head_dim):
    # float32 doubles the bf16-tuned tiles: an H200 refused a 320 KiB float32 prefill launch.
    from pallas_kernels.ragged_paged_attention.block_sizes import _DEFAULT_SMEM_BYTES, _SMEM_BYTES, default_block_sizes, smem_bytes

    shape = dict(num_tokens=num_tokens, max_num_seqs=256, num_q_heads=32, num_kv_heads=8, head_dim=head_dim,
                 page_size=16, pages_per_seq=128, device_kind=kind)
    bf16 = default_block_sizes(**shape, itemsize=2)
    f32 = default_block_sizes(**shape, itemsize=4)
    q_rows = max(16, bf16.block_q * 4)
    for bs, itemsize in ((bf16, 2), (f32, 4)):
        need = smem_bytes(bs.pages_per_block * 16, q_rows, head_dim, itemsize, bs.num_stages)
        assert need <= _SMEM_BYTES.get(kind, _DEFAULT_SMEM_BYTES), (bs, itemsize)
    assert f32.pages_per_block <= bf16.pages_per_block
    if kind == "NVIDIA H200" and num_tokens == 8192 and head_dim == 128:
        assert (bf16.pages_per_block, f32.pages_per_block) == (8, 4)  # 128 keys/step bf16, 64 in float32
