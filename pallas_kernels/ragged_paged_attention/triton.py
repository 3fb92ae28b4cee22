"""Ragged paged attention in Pallas for NVIDIA GPUs: every scheduled token of a step
(decodes with q_len 1 and prefill chunks with earlier context) in one call (one kernel, or
two on Hopper: see Backends), K/V read straight from the paged cache through the block tables.

Semantics are those of `ragged_paged_attention_reference` (same signature, same
docstring); the cache layout is written down in `pallas_kernels.kv_cache`:
`[2, Hkv, num_pages, page_size, D]`, so one program that owns one KV head reads whole
pages (`page_size * D` contiguous elements) with wide coalesced loads. A KV tile is loaded
as one [block_kv, D] gather (each key row's page looked up in the block table), so the
load feeds the dot directly, with no reshape between them.

Backends: this body is written for the Pallas *Triton* lowering
(`jax.experimental.pallas.triton`); on Hopper the prefill chunks of a batch (sequences with
>= MOSAIC_MIN_Q_LEN query tokens) go to a second body written for Mosaic GPU
(`ragged_paged_attention_mosaic`, see `prefill_body`), the two results summed (each writes
zeros for the tokens it leaves to the other).
- Why Triton for decode: decode is memory bound (~1 flop/byte at GQA 4..8), so what
  matters is streaming pages at HBM speed, which Triton's pipelined (cp.async) loads do
  (90-118% of a device copy's rate on an H200); a tile holds the Hq // Hkv query heads of
  a KV head for a few tokens (16 rows), which Mosaic GPU's 64-row wgmma tiles fit badly.
- Why Mosaic GPU for prefill: prefill is compute bound, and TMA copies, wgmma and a
  producer warpgroup feeding two consumers reach 58-65% of the bf16 matmul rate on long
  prefills where this body reaches 22-34% (benchmarks/RESULTS.md).
- Tests: every kernel runs on CPU under jax 0.10.2, this one in the generic
  `interpret=True` HLO interpreter (stable in 0.10 and 0.11, fast enough for the suite),
  the Mosaic GPU one in JAX's Mosaic GPU interpreter (simulated threads, TMA, barriers;
  slower, private API). Both also cross-lower on CPU (`.lower(lowering_platforms=("cuda",))`;
  the Mosaic GPU body under jax 0.11.2 in a Python 3.12 venv, benchmarks/kernels_NOTES.md).
- Cost: jax 0.11 warns that the Triton lowering is deprecated. The backend is private
  to this module (`_pallas_call_triton`); a Mosaic GPU decode body could replace it behind
  the same wrapper and tests without touching any caller.

Grid: (query block, KV head, KV split). Query blocks are cut per sequence (block_q tokens
of one sequence each; the host-side-free metadata is computed with jnp in the wrapper),
so a decode and a prefill chunk never share a tile. A tile holds block_q tokens x the
Hq // Hkv query heads of one KV head (rows token-major, padded to a power of two >= 16),
so GQA reads each KV page once per query block. Each program loops over the KV blocks its
rows can see (causal, sliding window) with an online softmax in fp32 (with
unmasked_interior, blocks every row sees whole go through a second, mask-free loop); with
num_kv_splits > 1 (flash-decoding for small decode batches) programs write partial
(acc, max, sum) and XLA merges them. The KV write stays an XLA scatter (`write_kv`):
measured in place at 16 us per 256-token step, so fusing it would save 1-3%. Pages past a sequence's length, keys past kv_len
and rows past cu_q_lens[num_seqs] are masked: NaN/garbage there never reaches the output.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ragged_paged_attention.block_sizes import MOSAIC_MIN_Q_LEN, BlockSizes, default_block_sizes, mosaic_block_sizes, shape_class
from pallas_kernels.ragged_paged_attention.query_blocks import query_blocks, served_tokens, token_seqs

_LOG2E = math.log2(math.e)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------- kernel body


def _kernel(
    blk_seq_ref,  # [NB] int32: sequence of each query block, -1 = no work
    blk_start_ref,  # [NB] int32: first token of the block within its sequence
    cu_q_ref,  # [S + 1] int32
    kv_lens_ref,  # [S] int32 (clamped to the page table's capacity)
    pages_ref,  # [S, P'] int32 (P' = P padded to a multiple of pages_per_block)
    q_ref,  # [R, D]: this KV head's query rows, token-major x group
    k_ref,  # [num_pages, page_size, D]: this KV head's keys
    v_ref,  # [num_pages, page_size, D]
    o_ref,  # [R, D] (one split) or [R, D] fp32 partial accumulators (several)
    *ml_refs,  # [R], [R] fp32 running max (log2 units) and sum, with several splits
    group: int,
    block_q: int,
    tile_rows: int,
    pages_per_block: int,
    num_kv_splits: int,
    unmasked_interior: bool,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    num_pages: int,
):
    b = pl.program_id(0)
    split = pl.program_id(2)
    seq = blk_seq_ref[b]
    page_size, d = k_ref.shape[1], k_ref.shape[2]
    block_kv = pages_per_block * page_size
    m_rows = tile_rows

    @pl.when(seq >= 0)
    def _():
        start = blk_start_ref[b]
        q_begin = cu_q_ref[seq]
        q_len = cu_q_ref[seq + 1] - q_begin
        kv_len = kv_lens_ref[seq]
        n_tok = jnp.minimum(block_q, q_len - start)  # >= 1 for a real block
        row0 = (q_begin + start) * group

        r = jnp.arange(m_rows, dtype=jnp.int32)
        row_ok = r < n_tok * group
        q_pos = kv_len - q_len + start + r // group  # absolute position of each row
        first_pos = kv_len - q_len + start
        last_pos = first_pos + n_tok - 1

        q = q_ref[pl.ds(row0, m_rows), :]
        q = jnp.where(row_ok[:, None], q, jnp.zeros_like(q))

        # The KV blocks these rows can see, then this split's share of them.
        hi = jnp.minimum(kv_len, last_pos + 1)
        lo = 0 if sliding_window is None else jnp.maximum(0, first_pos - sliding_window + 1)
        blk_lo = lo // block_kv
        blk_hi = (hi + block_kv - 1) // block_kv
        if num_kv_splits > 1:
            per = (blk_hi - blk_lo + num_kv_splits - 1) // num_kv_splits
            blk_lo = blk_lo + split * per
            blk_hi = jnp.minimum(blk_hi, blk_lo + per)

        dot_precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        scale = sm_scale if soft_cap is not None else sm_scale * _LOG2E
        neg_inf = jnp.float32(-jnp.inf)

        key_in_block = jnp.arange(block_kv, dtype=jnp.int32)

        def step(j, carry, masked):
            acc, m_i, l_i = carry
            # Each key row's page and offset, so K/V load as [block_kv, D] tiles straight
            # from their pointers (no reshape between the load and the dot).
            page = pages_ref[seq, j * pages_per_block + key_in_block // page_size]
            page = jnp.clip(page, 0, num_pages - 1)
            k = k_ref[page, key_in_block % page_size, :]
            v = v_ref[page, key_in_block % page_size, :]

            s = pltriton.dot(q, k, trans_b=True, precision=dot_precision) * scale
            if soft_cap is not None:
                s = jnp.tanh(s / soft_cap) * (soft_cap * _LOG2E)
            if masked:
                k_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
                k_ok = k_pos < kv_len
                mask = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
                if sliding_window is not None:
                    mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
                s = jnp.where(mask, s, neg_inf)
                # Keys past kv_len may be NaN/garbage: p is 0 there, but 0 * NaN is NaN.
                v = jnp.where(k_ok[:, None], v, jnp.zeros_like(v))

            m_new = jnp.maximum(m_i, s.max(axis=1))
            m_safe = jnp.where(m_new == neg_inf, 0.0, m_new)  # fully masked rows so far
            alpha = jnp.exp2(m_i - m_safe)
            p = jnp.exp2(s - m_safe[:, None])
            l_new = alpha * l_i + p.sum(axis=1)
            pv = pltriton.dot(p.astype(v.dtype), v, precision=dot_precision)
            return acc * alpha[:, None] + pv, m_new, l_new

        carry = (
            jnp.zeros((m_rows, d), jnp.float32),
            jnp.full((m_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((m_rows,), jnp.float32),
        )
        masked_step = functools.partial(step, masked=True)
        if not unmasked_interior:  # one loop, every block masked (measured best for decode)
            acc, m_i, l_i = jax.lax.fori_loop(blk_lo, blk_hi, masked_step, carry)
            _store(acc, m_i, l_i, row0, row_ok, o_ref, ml_refs, num_kv_splits, m_rows)
            return

        # Blocks every row of the tile sees whole (no causal, window or kv_len edge)
        # skip the masking: [blk_lo, a) masked, [a, c) unmasked, [c, blk_hi) masked.
        full_lo = 0
        if sliding_window is not None:
            full_lo = (last_pos - sliding_window + block_kv) // block_kv
        full_hi = (first_pos + 1) // block_kv
        a = jnp.clip(full_lo, blk_lo, blk_hi)
        c = jnp.clip(full_hi, a, blk_hi)
        if sliding_window is not None:
            carry = jax.lax.fori_loop(blk_lo, a, masked_step, carry)
        carry = jax.lax.fori_loop(a, c, functools.partial(step, masked=False), carry)
        acc, m_i, l_i = jax.lax.fori_loop(c, blk_hi, masked_step, carry)

        _store(acc, m_i, l_i, row0, row_ok, o_ref, ml_refs, num_kv_splits, m_rows)


def _store(acc, m_i, l_i, row0, row_ok, o_ref, ml_refs, num_kv_splits, m_rows):
    """Write this tile's valid rows: normalised output, or the split's partial state."""
    rows = pl.ds(row0, m_rows)
    if num_kv_splits == 1:
        inv = jnp.where(l_i > 0.0, 1.0 / l_i, 0.0)
        out = (acc * inv[:, None]).astype(o_ref.dtype)
        pltriton.store(o_ref.at[rows, :], out, mask=row_ok[:, None])
    else:
        m_ref, l_ref = ml_refs
        pltriton.store(o_ref.at[rows, :], acc, mask=row_ok[:, None])
        pltriton.store(m_ref.at[rows], m_i, mask=row_ok)
        pltriton.store(l_ref.at[rows], l_i, mask=row_ok)


# ------------------------------------------------------------------ pallas_call builder


def _pallas_call_triton(
    metadata,
    q_t,  # [Hkv, R, D]
    kv_cache,
    *,
    grid,
    out_dtype,
    num_warps,
    num_stages,
    interpret,
    **kernel_params,
):
    hkv, r_rows, d = q_t.shape
    _, _, num_pages, page_size, _ = kv_cache.shape
    splits = kernel_params["num_kv_splits"]

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    in_specs = [whole(x) for x in metadata] + [
        pl.BlockSpec((None, r_rows, d), lambda b, h, k: (h, 0, 0)),
        pl.BlockSpec((None, None, num_pages, page_size, d), lambda b, h, k: (0, h, 0, 0, 0)),
        pl.BlockSpec((None, None, num_pages, page_size, d), lambda b, h, k: (1, h, 0, 0, 0)),
    ]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((hkv, r_rows, d), out_dtype)]
        out_specs = [pl.BlockSpec((None, r_rows, d), lambda b, h, k: (h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((splits, hkv, r_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, hkv, r_rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, hkv, r_rows), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, r_rows, d), lambda b, h, k: (k, h, 0, 0)),
            pl.BlockSpec((None, None, r_rows), lambda b, h, k: (k, h, 0)),
            pl.BlockSpec((None, None, r_rows), lambda b, h, k: (k, h, 0)),
        ]
    kernel = functools.partial(_kernel, num_pages=num_pages, **kernel_params)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*metadata, q_t, kv_cache, kv_cache)


# ---------------------------------------------------------------------- public wrapper


def _validate(q, kv_cache, kv_lens, page_indices, cu_q_lens, bs_args):
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must be [2, Hkv, num_pages, page_size, D], got shape {kv_cache.shape}"
        )
    t, hq, d = q.shape
    _, hkv, _, page_size, dk = kv_cache.shape
    if dk != d:
        raise ValueError(f"q head_dim {d} != kv_cache head_dim {dk}")
    if hq % hkv:
        raise ValueError(f"num q heads {hq} must be a multiple of num kv heads {hkv}")
    if not _is_pow2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 (64/128/256), got {d}")
    if not _is_pow2(page_size):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if page_indices.ndim != 2 or kv_lens.shape != (page_indices.shape[0],):
        raise ValueError(
            f"page_indices must be [S, P] and kv_lens [S]; got {page_indices.shape}, "
            f"{kv_lens.shape}"
        )
    if cu_q_lens.shape != (page_indices.shape[0] + 1,):
        raise ValueError(f"cu_q_lens must be [S + 1], got {cu_q_lens.shape}")
    block_q, pages_per_block, num_kv_splits, num_warps, num_stages = bs_args
    if block_q is not None and (not isinstance(block_q, int) or block_q < 1):
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    if pages_per_block is not None:
        if not isinstance(pages_per_block, int) or not _is_pow2(pages_per_block):
            raise ValueError(f"pages_per_block must be a power of two, got {pages_per_block!r}")
        if pages_per_block * page_size < 16:
            raise ValueError(
                f"pages_per_block * page_size = {pages_per_block * page_size} keys per step; "
                "the tensor-core dot needs at least 16"
            )
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or num_kv_splits < 1):
        raise ValueError(f"num_kv_splits must be a positive int, got {num_kv_splits!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if num_stages is not None and (not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")


def _hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no backend at all
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


PREFILL_BODIES = ("auto", "mosaic", "triton")


def _prefill_body(choice: str, q: jax.Array, kv_cache: jax.Array, num_seqs_max: int, sliding_window: int | None,
                  soft_cap: float | None, interpret: bool, explicit_blocks: bool) -> str:
    """Which body serves the prefill chunks: "mosaic" (FlashAttention-3 style, Hopper only;
    decodes and short chunks stay on this module's Triton body) or "triton" (everything).
    q [T, Hq, D], kv_cache [2, Hkv, num_pages, page_size, D]."""
    if choice not in PREFILL_BODIES:
        raise ValueError(f"prefill_body must be 'auto', 'mosaic' or 'triton', got {choice!r}")
    if choice == "triton" or (choice == "auto" and (
            interpret or explicit_blocks or shape_class(q.shape[0], num_seqs_max) != "mixed" or not _hopper())):
        return "triton"
    from pallas_kernels.ragged_paged_attention.mosaic import supports  # Mosaic GPU: imported when used

    if supports(q, kv_cache, mosaic_block_sizes(q.shape[-1])[0], sliding_window, soft_cap):
        return "mosaic"
    if choice == "mosaic":
        raise ValueError(f"prefill_body='mosaic' does not take q {q.shape} {q.dtype}, cache {kv_cache.shape} "
                         f"{kv_cache.dtype}, sliding_window {sliding_window}, soft_cap {soft_cap}")
    return "triton"


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "block_q",
        "pages_per_block",
        "num_kv_splits",
        "num_warps",
        "num_stages",
        "unmasked_interior",
        "prefill_body",
        "interpret",
    ),
)
def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    kv_cache: jax.Array,  # [2, Hkv, num_pages, page_size, D]
    kv_lens: jax.Array,  # [S] int32
    page_indices: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    num_seqs: jax.Array,  # [] or [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_kv_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    unmasked_interior: bool | None = None,
    prefill_body: str = "auto",
    interpret: Any = False,
) -> jax.Array:  # [T, Hq, D]
    """Ragged paged attention (see the module docstring and the reference's).

    Block sizes of the Triton body (keyword-only, static; None = `pallas_kernels.ragged_paged_attention.block_sizes`):
      block_q: query tokens of one sequence per program.
      pages_per_block: KV pages per inner step (power of two; >= 16 keys per step).
      num_kv_splits: programs sharing one query block's KV range (flash-decoding).
      num_warps, num_stages: Triton launch width and software-pipelining depth.
      unmasked_interior: run the KV blocks that every row sees whole through a second,
        mask-free loop (faster for prefill tiles; slower for decode on an H100, where
        the single loop pipelines better).
    prefill_body: "mosaic" sends the sequences with q_len >= MOSAIC_MIN_Q_LEN to the Mosaic
      GPU body (`ragged_paged_attention_mosaic`, 1.6-2.3x this body's speed on H200 prefill)
      and the rest to this body's decode tiles; "triton" keeps every token here; "auto" =
      "mosaic" for a batch with prefill tokens (T > S) on a Hopper GPU when the Mosaic body
      `supports` it and no Triton block size is given (the engine's choice:
      EngineConfig.prefill_attention_body).
    interpret: run on the CPU. True: this body in the HLO interpreter ("auto" then keeps
      every token here). For the Mosaic GPU body, JAX's Mosaic GPU interpreter parameters
      instead (`InterpretGPUParams()`: exported by `jax.experimental.pallas.mosaic_gpu` from
      jax 0.11, only privately in 0.10): that body runs in that interpreter, this one in
      the HLO interpreter.
    """
    bs_args = (block_q, pages_per_block, num_kv_splits, num_warps, num_stages)
    _validate(q, kv_cache, kv_lens, page_indices, cu_q_lens, bs_args)
    args = (q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    t, hq, d = q.shape
    _, hkv, _, page_size, _ = kv_cache.shape
    s_max, p = page_indices.shape
    explicit = any(x is not None for x in bs_args) or unmasked_interior is not None
    body = _prefill_body(prefill_body, q, kv_cache, s_max, sliding_window, soft_cap, bool(interpret), explicit)
    shape = dict(num_tokens=t, max_num_seqs=s_max, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                 page_size=page_size, pages_per_seq=p, itemsize=max(q.dtype.itemsize, kv_cache.dtype.itemsize))
    if body == "mosaic":
        from pallas_kernels.ragged_paged_attention.mosaic import ragged_paged_attention_mosaic

        if interpret is True:
            raise ValueError("prefill_body='mosaic' on the CPU runs in JAX's Mosaic GPU interpreter: pass its "
                             "parameters as interpret=InterpretGPUParams(), not interpret=True")

        # Each body writes zeros for the tokens it does not serve, so the sum is either's result.
        block_kv, stages, pingpong = mosaic_block_sizes(d)
        long = ragged_paged_attention_mosaic(
            *args, sm_scale=sm_scale, block_kv=block_kv, stages=stages, pingpong=pingpong,
            min_q_len=MOSAIC_MIN_Q_LEN, interpret=interpret or None)
        short = _triton(*args, sm_scale=sm_scale, sliding_window=None, soft_cap=None,
                        bs=default_block_sizes(**shape, as_class="decode"),
                        q_len_range=(1, MOSAIC_MIN_Q_LEN), interpret=bool(interpret))
        return long + short
    given = dict(block_q=block_q, pages_per_block=pages_per_block, num_kv_splits=num_kv_splits,
                 num_warps=num_warps, num_stages=num_stages, unmasked_interior=unmasked_interior)
    bs = dataclasses.replace(default_block_sizes(**shape), **{k: v for k, v in given.items() if v is not None})
    return _triton(*args, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, bs=bs,
                   q_len_range=(1, None), interpret=bool(interpret))


def _triton(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float, sliding_window,
            soft_cap, bs: BlockSizes, q_len_range: tuple[int, int | None], interpret: bool) -> jax.Array:
    """This module's body on the sequences whose q_len lies in q_len_range; zeros elsewhere."""
    t, hq, d = q.shape
    _, hkv, _, _, _ = kv_cache.shape
    s_max, p = page_indices.shape
    group = hq // hkv
    tile_rows = _next_pow2(max(16, bs.block_q * group))

    blocks = query_blocks(cu_q_lens, num_seqs, kv_lens, t, p * kv_cache.shape[3], bs.block_q, q_len_range)
    cu, nb = blocks.cu_q_lens, blocks.num_blocks
    blk_seq = jnp.where(blocks.real, blocks.seq, -1)
    p_pad = -(-p // bs.pages_per_block) * bs.pages_per_block
    pages = jnp.pad(page_indices.astype(jnp.int32), ((0, 0), (0, p_pad - p)))

    # Query rows per KV head, token-major x group, padded so a tile never runs past.
    q_t = q.reshape(t, hkv, group, d).transpose(1, 0, 2, 3).reshape(hkv, t * group, d)
    q_t = jnp.pad(q_t, ((0, 0), (0, tile_rows), (0, 0)))

    outs = _pallas_call_triton(
        (blk_seq, blocks.start, cu, blocks.kv_lens, pages),
        q_t,
        kv_cache,
        grid=(nb, hkv, bs.num_kv_splits),
        out_dtype=q.dtype,
        num_warps=bs.num_warps,
        num_stages=bs.num_stages,
        interpret=interpret,
        group=group,
        block_q=bs.block_q,
        tile_rows=tile_rows,
        pages_per_block=bs.pages_per_block,
        num_kv_splits=bs.num_kv_splits,
        unmasked_interior=bool(bs.unmasked_interior),
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if bs.num_kv_splits == 1:
        out = outs[0].astype(jnp.float32)
    else:  # merge the splits' partial softmax states (flash-decoding)
        acc, m, l = outs
        m_max = m.max(axis=0)
        m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
        w = jnp.exp2(m - m_max[None])  # [K, Hkv, R]
        l_tot = (w * l).sum(axis=0)
        out = (w[..., None] * acc).sum(axis=0)
        out = out * jnp.where(l_tot > 0.0, 1.0 / l_tot, 0.0)[..., None]
    out = out[:, : t * group].reshape(hkv, t, group, d).transpose(1, 0, 2, 3)
    out = out.reshape(t, hq, d)
    # Rows no program wrote (padding tokens, sequences outside q_len_range) hold garbage.
    return jnp.where(served_tokens(blocks, token_seqs(cu, t))[:, None, None], out, 0.0).astype(q.dtype)
