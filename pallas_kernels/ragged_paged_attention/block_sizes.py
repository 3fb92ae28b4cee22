"""Block sizes for the ragged paged attention kernel: a small tuned table keyed by device
kind and shape class, with a sensible default for anything not in it.

Only static facts go into the key (the jitted wrapper picks its blocks at trace time):
the device kind, the shape class of the batch and the head dim.

    shape class   when (static shapes only)          what the batch mostly is
    "decode"      T <= S                              one new token per sequence
    "mixed"       S < T                               prefill chunks, maybe with decodes

The numbers came from `benchmarks/kernels.py --tune` on an H100 (benchmarks/kernels_NOTES.md);
other kinds use the defaults, which are the H100 numbers.
"""

import dataclasses
import math

import jax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_q: query tokens per program (its tile has block_q * (Hq // Hkv) rows, padded
    to a power of two >= 16); pages_per_block: KV pages per inner-loop step (the KV tile
    is pages_per_block * page_size tokens); num_kv_splits: programs that share one query
    block's KV range (flash-decoding; partial results are merged in XLA), None = pick
    from the grid size; num_warps / num_stages: Triton launch and pipelining depth;
    unmasked_interior: a second, mask-free loop for KV blocks every row sees whole."""

    block_q: int
    pages_per_block: int
    num_kv_splits: int | None
    num_warps: int
    num_stages: int
    unmasked_interior: bool


# Per (shape class, head_dim class):
# (kv_tokens_per_block, q_rows_per_tile, num_warps, num_stages, unmasked_interior)
# H100 (benchmarks/kernels_NOTES.md): decode b256 ctx2k best at 64 keys/step, 3 stages,
# 4 warps, one masked loop (the two-loop variant cost 20-50% on decode); prefill 1x8k
# best at 128-row tiles, 128 keys/step, 8 warps, 2 stages, interior blocks unmasked.
_DEFAULT = {
    ("decode", 64): (128, 16, 4, 3, False),
    ("decode", 128): (64, 16, 4, 3, False),
    ("decode", 256): (32, 16, 4, 3, False),
    ("mixed", 64): (128, 128, 8, 2, True),
    ("mixed", 128): (128, 128, 8, 2, True),
    ("mixed", 256): (64, 64, 8, 2, True),
}

# Per device kind overrides of _DEFAULT (same keys). Device kinds as jax reports them.
_TUNED: dict[str, dict[tuple[str, int], tuple[int, int, int, int, bool]]] = {
    "NVIDIA H100 80GB HBM3": {},
    "NVIDIA H200": {},
}

# Shared memory one program may use (bytes; Triton's limit on that device). float32 inputs
# double the tiles of the bf16-tuned table: an H200 refused 320 KiB for a float32 prefill
# tile, so the KV tile shrinks until a launch fits.
_SMEM_BYTES = {"NVIDIA H100 80GB HBM3": 232448, "NVIDIA H200": 232448}
_DEFAULT_SMEM_BYTES = 163840  # an A100's; later GPUs have more

# Programs to aim for when splitting the KV range of decode blocks: ~2 waves on an H100.
_TARGET_PROGRAMS = {"NVIDIA H100 80GB HBM3": 2 * 132, "NVIDIA H200": 2 * 132}
_DEFAULT_TARGET_PROGRAMS = 256


def _device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except Exception:  # pragma: no cover - no backend at all
        return "unknown"


def smem_bytes(kv_tokens: int, q_rows: int, head_dim: int, itemsize: int, num_stages: int) -> int:
    """Shared memory of one launch: `num_stages` buffered K and V tiles and the Q tile (the
    H200's refusal quoted exactly this: 2 * 2 * 128 * 128 * 4 + 128 * 128 * 4 bytes)."""
    return (num_stages * 2 * kv_tokens + max(16, q_rows)) * head_dim * itemsize


def shape_class(num_tokens: int, num_seqs: int) -> str:
    return "decode" if num_tokens <= num_seqs else "mixed"


# The Mosaic GPU prefill body (Hopper) takes the sequences with at least this many query
# tokens; shorter ones (decodes, last chunks) stay on the Triton body's decode tiles: the
# Mosaic body gives each sequence whole 128-row blocks per query head.
MOSAIC_MIN_Q_LEN = 64


def mosaic_block_sizes(head_dim: int) -> tuple[int, int, bool]:
    """(block_kv, stages, pingpong) of the Mosaic GPU body. H200, head_dim 128: 128/2 with
    the consumers taking turns was the fastest of 128/2, 64/3 (each with and without) on
    every prefill shape. head_dim 256 halves the KV step so two stages of K and V fit the
    shared memory."""
    return (128, 2, True) if head_dim <= 128 else (64, 2, True)


def default_block_sizes(
    *,
    num_tokens: int,
    max_num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    itemsize: int = 2,
    device_kind: str | None = None,
    as_class: str | None = None,
) -> BlockSizes:
    """Block sizes for these static shapes on this device (kind defaults to device 0's);
    `itemsize`: bytes per element of q and the KV cache (2 for bf16/fp16, 4 for fp32);
    `as_class` overrides the shape class the shapes imply (decode tiles for the decodes of a
    mixed batch that the Mosaic body leaves to this one)."""
    kind = _device_kind() if device_kind is None else device_kind
    cls = as_class or shape_class(num_tokens, max_num_seqs)
    dclass = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
    table = {**_DEFAULT, **_TUNED.get(kind, {})}
    kv_tokens, q_rows, num_warps, num_stages, unmasked = table[(cls, dclass)]

    group = num_q_heads // num_kv_heads
    budget = _SMEM_BYTES.get(kind, _DEFAULT_SMEM_BYTES)
    while kv_tokens > 16 and smem_bytes(kv_tokens, q_rows, head_dim, itemsize, num_stages) > budget:
        kv_tokens //= 2
    block_q = max(1, q_rows // group)
    pages_per_block = max(1, kv_tokens // page_size)
    pages_per_block = min(pages_per_block, 1 << max(0, (pages_per_seq - 1).bit_length()))
    if pages_per_block * page_size < 16:  # the tensor-core dot wants >= 16 keys
        pages_per_block = -(-16 // page_size)

    num_kv_splits = 1
    if cls == "decode":
        target = _TARGET_PROGRAMS.get(kind, _DEFAULT_TARGET_PROGRAMS)
        programs = max(1, max_num_seqs * num_kv_heads)
        kv_blocks = max(1, math.ceil(pages_per_seq / pages_per_block))
        num_kv_splits = max(1, min(16, kv_blocks, math.ceil(target / programs)))
    return BlockSizes(block_q, pages_per_block, num_kv_splits, num_warps, num_stages, unmasked)
