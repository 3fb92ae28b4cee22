"""Ragged paged attention for prefill on Hopper, written for the Pallas Mosaic GPU backend.

STATUS: used by the engine on Hopper GPUs for the sequences of a step with >= 64 query
tokens (`ragged_paged_attention(prefill_body="auto")` routes them here; decodes and short
chunks stay on the Triton body). On an H200 (benchmarks/RESULTS.md) it reaches
58-65% of the bf16 matmul rate on 8k-token prefills and 0.86-0.96x cuDNN's speed, against
the Triton body's 22-34%. Checked against the reference on the GPU and, on the CPU, in JAX's
Mosaic GPU interpreter (simulated warpgroups, TMA and barriers); its GPU path also lowers
for sm_90 on the CPU (`tests/pallas_kernels/ragged_paged_attention/test_ragged_paged_attention_mosaic.py`; the
interpreter deadlocks on a 2-core machine unless NPROC >= 4, see tests/conftest.py).

Why a second body: the Triton-lowered kernel (`ragged_paged_attention`) streams decode
at the HBM rate but reaches only 22-34% of the bf16 matmul rate on prefill (no TMA, no
warpgroup MMA it can be sure of, no producer/consumer split).
This body is the FlashAttention-3 shape: per program, two consumer warpgroups of 64 query
rows each (one wgmma M tile) and one producer warpgroup that copies K/V pages from the
paged cache into a ring of shared-memory slots with TMA, one copy per page, and signals a
barrier per slot.

Same semantics as the reference for what it supports: causal attention where query i of
sequence s sits at position `kv_lens[s] - q_len[s] + i`, GQA, bf16/fp16, head_dim a
multiple of 64, `block_kv` a multiple of 64 and of the page size; no sliding window, no
soft cap, no float32 (those stay on the Triton body). The cache layout is the one
documented in `pallas_kernels.kv_cache`: `[2, Hkv, num_pages, page_size, D]`.

Layout around the kernel (XLA gathers, one pass over q and one over the output each):
queries are regrouped into blocks of BLOCK_Q tokens of one sequence, `[Hq, NB * BLOCK_Q,
D]`, so each consumer's 64 rows are one contiguous TMA box and a block never mixes two
sequences; rows past a sequence's end compute garbage that the gather back drops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention.query_blocks import query_blocks, served_tokens, token_seqs

ROWS = 64  # query rows per consumer warpgroup: one wgmma M tile
CONSUMERS = 2
BLOCK_Q = ROWS * CONSUMERS  # query tokens of one sequence per program
_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite: a row masked whole in one step must not turn exp2 into NaN


def _kernel(meta_ref, pages_ref, q_ref, kv_ref, o_ref, scratch, *, sm_scale: float, group: int,
            block_kv: int, page_size: int, stages: int, num_pages: int, pingpong: bool, interpreting: bool):
    """One program: query block `block` (BLOCK_Q tokens of one sequence) x query head `head`.

    meta_ref [NB, 3] int32: sequence, position of the block's first token, kv_len (0 for
    a block with no tokens). pages_ref [S, P'] int32. q_ref / o_ref [Hq, NB *
    BLOCK_Q, D]. kv_ref [2, Hkv, num_pages, page_size, D].

    pingpong (FlashAttention-3's warpgroup scheduling): the consumers take turns on the
    tensor cores, one issuing its matmuls while the other runs its softmax, paired through
    the `turn` barrier; consumer 1 starts one turn late and consumer 0 ends one turn late."""
    (q_smem, k_smem, v_smem, p_smem, kt_smem), (q_ready, k_ready, v_ready), (k_free, v_free), turn = scratch
    # Heaviest first: a sequence's last blocks see the most keys, and the grid runs "head"
    # fastest, so all heads of the last block start in the first wave (less tail on few SMs).
    block = meta_ref.shape[0] - 1 - lax.axis_index("block")
    head, wg = lax.axis_index("head"), lax.axis_index("wg")
    seq, pos0, kv_len = meta_ref[block, 0], meta_ref[block, 1], meta_ref[block, 2]
    kv_head = head // group
    pages_per_step = block_kv // page_size
    d = q_smem.shape[-1]

    # Register layouts are hints for the GPU lowering; jax 0.10's CPU interpreter has no rule
    # for them (and its wgmma takes the softmax weights from shared memory, p_smem).
    def iota(shape, dim):
        if interpreting:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def wgmma_layout(x, reduced: bool = False):
        if interpreting:
            return x
        return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1) if reduced else plgpu.Layout.WGMMA)

    def num_steps(w):  # KV steps the rows of consumer w can see (causal; stops at kv_len)
        end = jnp.clip(pos0 + (w + 1) * ROWS, 0, kv_len)
        return (end + block_kv - 1) // block_kv

    last_steps = num_steps(CONSUMERS - 1)  # the producer serves the consumer that sees most

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def load(step, slot, ready, kv):
            for i in range(pages_per_step):
                page = jnp.clip(pages_ref[seq, step * pages_per_step + i], 0, num_pages - 1)
                dst = (k_smem if kv == 0 else v_smem).at[slot, pl.ds(i * page_size, page_size)]
                plgpu.copy_gmem_to_smem(kv_ref.at[kv, kv_head, page], dst, ready.at[slot])

        for step in range(stages):  # fill the ring
            @pl.when(step < last_steps)
            def _():
                load(step, step, k_ready, 0)
                load(step, step, v_ready, 1)

        @pl.loop(stages, jnp.maximum(last_steps, stages))
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_free.at[slot])  # both consumers are done with step - stages
            load(step, slot, k_ready, 0)
            plgpu.barrier_wait(v_free.at[slot])
            load(step, slot, v_ready, 1)

        for i in range(stages):  # see the last steps released too: every phase waited once
            @pl.when(last_steps - stages + i >= 0)
            def _():
                slot = lax.rem(last_steps - stages + i, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def take_turn():  # both consumers arrive; each waits for the other's arrival
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    @pl.when((wg < CONSUMERS) & (kv_len > 0))  # a block with no tokens (past the last) writes nothing
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_tile = q_smem.at[wg]
        row0 = block * BLOCK_Q + wg * ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[head, pl.ds(row0, ROWS)], q_tile, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        first_pos = pos0 + wg * ROWS  # position of this consumer's first row
        steps = num_steps(wg)
        # Steps whose keys every row sees whole: all keys <= first_pos and < kv_len.
        unmasked = jnp.clip(jnp.minimum((first_pos + 1) // block_kv, kv_len // block_kv), 0, steps)
        scale = sm_scale * _LOG2E  # softmax in base 2

        def step_fn(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[slot])

            k_t = k_smem.at[slot].transpose((1, 0))
            if interpreting:  # jax 0.10's interpreter cannot transpose a wgmma operand: copy K^T
                kt_smem.at[wg][...] = k_smem.at[slot][...].T
                k_t = kt_smem.at[wg]

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_t)
                take_turn()  # let the other consumer issue while this one waits and softmaxes
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32)) * scale
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                key = step * block_kv + iota((ROWS, block_kv), 1)
                s = jnp.where((key <= first_pos + iota((ROWS, block_kv), 0)) & (key < kv_len), s, _MASKED)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if pingpong:
                plgpu.barrier_arrive(turn)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            if pingpong:
                plgpu.barrier_wait(turn)  # the other consumer is off the tensor cores
            v_tile = v_smem.at[slot]
            if masked:  # keys past kv_len may hold NaN, and p = 0 times NaN is NaN: zero them
                @pl.when(kv_len - step * block_kv < block_kv)
                def _():
                    v = v_tile[...]
                    v_tile[...] = jnp.where(iota((block_kv, d), 0) < kv_len - step * block_kv, v, jnp.zeros_like(v))
                    plgpu.commit_smem()

            p_lo = p.astype(v_smem.dtype)
            if interpreting:
                p_smem.at[wg][...] = p_lo
                plgpu.commit_smem()
                p_lo = p_smem.at[wg]

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_lo, v_tile)
                return acc_ref[...]

            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, d), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        carry = (
            wgmma_layout(jnp.zeros((ROWS, d), jnp.float32)),
            wgmma_layout(jnp.full((ROWS,), _MASKED, jnp.float32), reduced=True),
            wgmma_layout(jnp.zeros((ROWS,), jnp.float32), reduced=True),
        )
        pl.when(wg == 1)(take_turn)
        carry = lax.fori_loop(0, unmasked, functools.partial(step_fn, masked=False), carry)
        acc, _, l_i = lax.fori_loop(unmasked, steps, functools.partial(step_fn, masked=True), carry)

        @pl.loop(steps, last_steps)
        def _(step):  # steps only the other consumer needs: wait and release, so the ring turns
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()  # the two turns of a step, so the other consumer's turns stay paired
            take_turn()

        pl.when(wg == 0)(take_turn)
        q_tile[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(q_tile.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[head, pl.ds(row0, ROWS)])
        plgpu.wait_smem_to_gmem(0)


def _call(meta, pages, q_blk, kv_cache, *, sm_scale: float, block_kv: int, stages: int, pingpong: bool,
          interpret):
    """interpret: None on a GPU, or plgpu.InterpretGPUParams() to run on the CPU, where the
    softmax weights go through shared memory (the GPU keeps them in registers)."""
    hq, rows, d = q_blk.shape
    _, hkv, num_pages, page_size, _ = kv_cache.shape
    nb = rows // BLOCK_Q
    smem = dict(transforms=(plgpu.TilingTransform((8, 128 // q_blk.dtype.itemsize)), plgpu.SwizzleTransform(128)))
    pages_per_step = block_kv // page_size

    def body(meta_ref, pages_ref, q_ref, kv_ref, o_ref):
        pl.run_scoped(
            lambda *scratch: _kernel(
                meta_ref, pages_ref, q_ref, kv_ref, o_ref, scratch, sm_scale=sm_scale,
                group=hq // hkv, block_kv=block_kv, page_size=page_size, stages=stages, num_pages=num_pages,
                pingpong=pingpong, interpreting=interpret is not None),
            (plgpu.SMEM((CONSUMERS, ROWS, d), q_blk.dtype, **smem),
             plgpu.SMEM((stages, block_kv, d), kv_cache.dtype, **smem),
             plgpu.SMEM((stages, block_kv, d), kv_cache.dtype, **smem),
             None if interpret is None else plgpu.SMEM((CONSUMERS, ROWS, block_kv), kv_cache.dtype),
             None if interpret is None else plgpu.SMEM((CONSUMERS, d, block_kv), kv_cache.dtype)),
            (plgpu.Barrier(num_barriers=CONSUMERS),
             plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),  # one arrival a page copy
             plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=CONSUMERS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q_blk.shape, q_blk.dtype),
        grid=(hq, nb),
        grid_names=("head", "block"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(meta, pages, q_blk, kv_cache)


def supports(q: jax.Array, kv_cache: jax.Array, block_kv: int, sliding_window, soft_cap) -> bool:
    """Whether this body computes the given call (else the Triton body does)."""
    d, page_size = q.shape[-1], kv_cache.shape[3]
    return (sliding_window is None and soft_cap is None and q.dtype == kv_cache.dtype
            and q.dtype in (jnp.bfloat16, jnp.float16) and d % 64 == 0 and d <= 256
            and block_kv % 64 == 0 and block_kv % page_size == 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "stages", "pingpong", "min_q_len", "interpret"))
def ragged_paged_attention_mosaic(
    q: jax.Array,  # [T, Hq, D]
    kv_cache: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_indices: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    block_kv: int = 128,
    stages: int = 2,
    pingpong: bool = False,
    min_q_len: int = 1,
    interpret=None,
) -> jax.Array:  # [T, Hq, D]
    """`ragged_paged_attention_reference`'s result for what `supports` accepts, on the
    sequences with q_len >= min_q_len (zeros for the others' tokens: another body serves
    them, e.g. decodes, which would use 1 of a block's 128 rows here)."""
    if not supports(q, kv_cache, block_kv, None, None):
        raise ValueError(f"the Mosaic GPU body does not take q {q.shape} {q.dtype}, cache "
                         f"{kv_cache.shape} {kv_cache.dtype}, block_kv {block_kv}")
    t, hq, d = q.shape
    page_size = kv_cache.shape[3]
    p = page_indices.shape[1]
    blocks = query_blocks(cu_q_lens, num_seqs, kv_lens, t, p * page_size, BLOCK_Q, (min_q_len, None))
    cu, nb, blk_seq, blk_start = blocks.cu_q_lens, blocks.num_blocks, blocks.seq, blocks.start
    pages_per_step = block_kv // page_size
    # Always pad (>= 1 column, never read): a fresh buffer. Mosaic GPU wants its operands
    # 256-byte aligned, and the engine's page table is a slice of one packed input buffer,
    # which XLA passed as is (an H200 refused it: "Input buffer 1 is not 256-byte aligned").
    pages = jnp.pad(page_indices.astype(jnp.int32), ((0, 0), (0, pages_per_step - p % pages_per_step)))
    meta = jnp.stack([  # [NB, 3]
        blk_seq,
        blocks.kv_lens[blk_seq] - blocks.q_lens[blk_seq] + blk_start,
        jnp.where(blocks.real, blocks.kv_lens[blk_seq], 0),
    ], axis=1)

    # Gather q into blocks (rows past a sequence's end repeat some token: garbage, dropped).
    tok = jnp.clip(cu[blk_seq][:, None] + blk_start[:, None] + jnp.arange(BLOCK_Q), 0, t - 1)
    q_blk = q[tok.reshape(-1)].transpose(1, 0, 2)  # [Hq, NB * BLOCK_Q, D]
    out_blk = _call(meta, pages, q_blk, kv_cache, sm_scale=float(sm_scale), block_kv=block_kv, stages=stages,
                    pingpong=pingpong, interpret=interpret)

    # And back: token i of sequence s is row i % BLOCK_Q of block cu_blocks[s] + i // BLOCK_Q.
    tok_seq = token_seqs(cu, t)
    i = jnp.arange(t, dtype=jnp.int32) - cu[tok_seq]
    rows = jnp.clip((blocks.cu_blocks[tok_seq] + i // BLOCK_Q) * BLOCK_Q + i % BLOCK_Q, 0, nb * BLOCK_Q - 1)
    out = out_blk[:, rows].transpose(1, 0, 2)  # [T, Hq, D]
    return jnp.where(served_tokens(blocks, tok_seq)[:, None, None], out, jnp.zeros_like(out))
