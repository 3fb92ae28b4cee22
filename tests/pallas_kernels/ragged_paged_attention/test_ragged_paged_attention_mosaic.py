"""The Mosaic GPU prefill body on the CPU: run in JAX's Mosaic GPU interpreter (simulated
warpgroups, TMA copies and barriers) against the jnp reference, and lowered for sm_90
unchanged (the interpreter path keeps the softmax weights and K^T in shared memory; the
GPU path keeps the weights in registers and transposes K in the wgmma, which only the
lowering test covers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.query_blocks import query_blocks
from pallas_kernels.ragged_paged_attention.triton import _prefill_body
from pallas_kernels.ragged_paged_attention.mosaic import ragged_paged_attention_mosaic, supports
from tests.pallas_kernels.ragged_paged_attention.paged_attention_inputs import make_case, rel_err

# JAX's Mosaic GPU interpreter: jax 0.11 exports its parameters from plgpu, jax 0.10.2 only
# from jax._src (no public name there).
if hasattr(plgpu, "InterpretGPUParams"):
    InterpretGPUParams = plgpu.InterpretGPUParams
else:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

TOL = {jnp.bfloat16: 1.5e-2, jnp.float16: 3e-3}


def run_interpreted(case, dtype, **kw):
    args = [jnp.asarray(a) for a in case.args()]
    args[0], args[1] = args[0].astype(dtype), args[1].astype(dtype)
    sm_scale = case.q.shape[-1] ** -0.5
    ref = ragged_paged_attention_reference(*args, sm_scale=sm_scale)
    out = ragged_paged_attention_mosaic(*args, sm_scale=sm_scale, interpret=InterpretGPUParams(), **kw)
    return np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))


@pytest.mark.parametrize("name, q_lens, kv_lens, group, page_size, block_kv, dtype, pingpong", [
    # fresh prefills (one block of 128 rows: both consumers, the second one partly padding)
    # and a chunk whose context spans three KV steps, with the ring turning (2 stages)
    ("prefill + chunk", [10, 70], [10, 150], 2, 16, 64, jnp.bfloat16, False),
    # decodes (q_len 1) beside a chunk; kv_len at a page boundary +-1; pages of 32 tokens;
    # the consumers taking turns (their turns must pair up even where one has fewer steps)
    ("mixed", [1, 1, 1, 40], [31, 32, 33, 130], 4, 32, 64, jnp.float16, True),
])
def test_interpreted_kernel_matches_reference(name, q_lens, kv_lens, group, page_size, block_kv, dtype, pingpong):
    # NaN in every page no sequence owns, past kv_len in each last page, in block-table
    # entries past a sequence's pages, and garbage in padded tokens and sequences.
    case = make_case(q_lens, kv_lens, num_q_heads=group, num_kv_heads=1, head_dim=64,
                     page_size=page_size, pad_tokens=3, pad_seqs=1, seed=len(name))
    out, ref = run_interpreted(case, dtype, block_kv=block_kv, pingpong=pingpong)
    assert np.isfinite(out).all(), "NaN from unused pages leaked into the output"
    assert rel_err(out, ref) < TOL[dtype], f"{name}: rel err {rel_err(out, ref):.2e}"
    assert not out[case.cu_q_lens[case.num_seqs[0]]:].any(), "padding tokens must come out as zeros"


@pytest.mark.parametrize("head_dim, page_size, block_kv, dtype, pingpong", [
    (128, 16, 128, jnp.bfloat16, False), (128, 16, 128, jnp.bfloat16, True), (128, 16, 64, jnp.bfloat16, False),
    (64, 64, 64, jnp.float16, False), (256, 32, 64, jnp.bfloat16, True)])
def test_gpu_path_lowers_for_sm90(head_dim, page_size, block_kv, dtype, pingpong):
    """The GPU path (weights in registers, transposed K operand, layout hints) goes through
    the whole Mosaic GPU lowering: layouts, wgmma operand rules, smem and barriers."""
    t, s, hq, hkv, num_pages, pages = 512, 4, 32, 8, 256, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((t, hq, head_dim), dtype), sd((2, hkv, num_pages, page_size, head_dim), dtype), sd((s,), jnp.int32),
            sd((s, pages), jnp.int32), sd((s + 1,), jnp.int32), sd((), jnp.int32))
    lowered = ragged_paged_attention_mosaic.trace(*args, sm_scale=head_dim ** -0.5, block_kv=block_kv,
                                                  pingpong=pingpong).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_what_it_does_not_take_is_refused():
    q = jnp.zeros((8, 4, 128), jnp.bfloat16)
    cache = jnp.zeros((2, 2, 8, 16, 128), jnp.bfloat16)
    assert supports(q, cache, 128, None, None)
    assert not supports(q.astype(jnp.float32), cache.astype(jnp.float32), 128, None, None)
    assert not supports(q, cache, 128, 64, None)  # sliding window
    assert not supports(q, cache, 128, None, 30.0)  # soft cap
    assert not supports(q, cache, 48, None, None)  # KV step not a multiple of 64
    args = (q.astype(jnp.float32), cache.astype(jnp.float32), jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32),
            jnp.array([0, 1, 2], jnp.int32), jnp.array(2, jnp.int32))
    with pytest.raises(ValueError, match="Mosaic GPU body does not take"):
        ragged_paged_attention_mosaic(*args, sm_scale=0.1)


def test_split_batch_matches_reference():
    """prefill_body="mosaic": the chunks of >= MOSAIC_MIN_Q_LEN tokens go through the Mosaic
    body, the decodes and the short chunk through the Triton body's decode tiles; every
    token must come out of exactly one of them (the other writes zeros)."""
    case = make_case([1, 70, 5, 1, 64], [40, 150, 33, 1, 64], num_q_heads=4, num_kv_heads=2, head_dim=64,
                     page_size=16, pad_tokens=3, pad_seqs=1, seed=3)
    args = [jnp.asarray(a) for a in case.args()]
    args[0], args[1] = args[0].astype(jnp.bfloat16), args[1].astype(jnp.bfloat16)
    ref = np.asarray(ragged_paged_attention_reference(*args, sm_scale=0.125).astype(jnp.float32))
    out = np.asarray(ragged_paged_attention(*args, sm_scale=0.125, prefill_body="mosaic",
                                            interpret=InterpretGPUParams()).astype(jnp.float32))
    assert np.isfinite(out).all()
    for s, (lo, hi) in enumerate(zip(case.cu_q_lens[:-1], case.cu_q_lens[1:])):
        if s < case.num_seqs[0]:
            assert rel_err(out[lo:hi], ref[lo:hi]) < TOL[jnp.bfloat16], f"sequence {s} (q_len {hi - lo})"
    assert not out[case.cu_q_lens[case.num_seqs[0]]:].any(), "padding tokens must come out as zeros"


def test_prefill_body_choice():
    q = jnp.zeros((8, 4, 128), jnp.bfloat16)
    cache = jnp.zeros((2, 2, 8, 16, 128), jnp.bfloat16)
    # On the CPU (and in interpret mode) "auto" keeps everything on the Triton body.
    assert _prefill_body("auto", q, cache, 2, None, None, interpret=False, explicit_blocks=False) == "triton"
    assert _prefill_body("mosaic", q, cache, 2, None, None, interpret=True, explicit_blocks=False) == "mosaic"
    with pytest.raises(ValueError, match="does not take"):  # a sliding window stays on the Triton body
        _prefill_body("mosaic", q, cache, 2, 64, None, interpret=False, explicit_blocks=False)
    with pytest.raises(ValueError, match="'auto', 'mosaic' or 'triton'"):
        _prefill_body("cudnn", q, cache, 2, None, None, interpret=False, explicit_blocks=False)
    # On the CPU the Mosaic GPU body needs its interpreter's parameters, not the HLO interpreter.
    args = (q, cache, jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32), jnp.array([0, 1, 2], jnp.int32),
            jnp.array(2, jnp.int32))
    with pytest.raises(ValueError, match="InterpretGPUParams"):
        ragged_paged_attention(*args, sm_scale=0.1, prefill_body="mosaic", interpret=True)


@pytest.mark.parametrize("q_len_range", [(1, None), (64, None), (1, 64), (3, 10)])
def test_query_blocks_cover_the_sequences_in_range(q_len_range):
    rng = np.random.default_rng(sum(x or 0 for x in q_len_range))
    for _ in range(20):
        s_max = int(rng.integers(1, 9))
        q_lens = rng.choice([0, 1, 2, 5, 9, 63, 64, 65, 200], size=s_max)
        n = int(rng.integers(0, s_max + 1))
        t = int(q_lens[:n].sum()) + int(rng.integers(0, 4))
        cu = np.concatenate([[0], np.cumsum(np.where(np.arange(s_max) < n, q_lens, 0))])
        b = query_blocks(jnp.asarray(cu), jnp.asarray(n), jnp.asarray(q_lens + 5), max(t, 1), 1000, 16, q_len_range)
        lo, hi = q_len_range
        want = [(s, start) for s in range(n) if lo <= q_lens[s] < (hi or 1 << 30) for start in range(0, q_lens[s], 16)]
        real = np.asarray(b.real)
        assert len(real) == b.num_blocks >= len(want), "the static bound must hold every block"
        got = list(zip(np.asarray(b.seq)[real].tolist(), np.asarray(b.start)[real].tolist()))
        assert got == want
