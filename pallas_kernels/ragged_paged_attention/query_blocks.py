"""The ragged batch cut into query blocks (block_q tokens of one sequence each): the grid
metadata both attention bodies compute with jnp inside their jitted wrappers."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class QueryBlocks(NamedTuple):
    num_seqs: jax.Array  # [] int32, clipped to [0, S]
    cu_q_lens: jax.Array  # [S + 1] int32, clipped to [0, T]
    q_lens: jax.Array  # [S] int32, 0 past num_seqs
    kv_lens: jax.Array  # [S] int32, clipped to the page table's capacity
    cu_blocks: jax.Array  # [S + 1] int32: first query block of each sequence
    num_blocks: int  # NB, a static bound on the number of blocks
    seq: jax.Array  # [NB] int32: each block's sequence (clipped to [0, S - 1])
    start: jax.Array  # [NB] int32: its first token within the sequence
    real: jax.Array  # [NB] bool: False for the blocks past the last one
    taken: jax.Array  # [S] bool: the sequence's q_len lies in q_len_range (it has blocks)


def query_blocks(cu_q_lens: jax.Array, num_seqs: jax.Array, kv_lens: jax.Array, num_tokens: int,
                 max_kv_len: int, block_q: int, q_len_range: tuple[int, int | None] = (1, None)) -> QueryBlocks:
    """The ragged metadata sanitised so that nothing a kernel reads can be out of bounds, and
    the query blocks of the sequences whose q_len lies in q_len_range = [lo, hi) (hi None:
    no upper end); the others get no block, so a second body can serve them.

    The number of blocks is bounded statically: n <= min(S, T // lo) sequences take part,
    and sum_s cdiv(q_len_s, block_q) <= cdiv(T - n, block_q) + n; with hi, also
    <= n * cdiv(hi - 1, block_q)."""
    lo, hi = q_len_range
    t, s_max = num_tokens, kv_lens.shape[0]
    n = jnp.clip(jnp.reshape(num_seqs, ()).astype(jnp.int32), 0, s_max)
    cu = jnp.clip(cu_q_lens.astype(jnp.int32), 0, t)
    q_lens = jnp.where(jnp.arange(s_max) < n, jnp.maximum(cu[1:] - cu[:-1], 0), 0)
    taken = (q_lens >= lo) & (True if hi is None else q_lens < hi)
    per_seq = jnp.where(taken, -(-q_lens // block_q), 0)
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(per_seq)]).astype(jnp.int32)
    n_max = min(s_max, t // max(1, lo))
    nb = -(-(t - n_max) // block_q) + n_max
    if hi is not None:
        nb = min(nb, n_max * -(-(hi - 1) // block_q))
    nb = max(1, nb)
    bids = jnp.arange(nb, dtype=jnp.int32)
    # compare_all: one fused compare (the default 'scan' is a while loop, ~10 us a step on GPUs).
    seq = jnp.clip(jnp.searchsorted(cu_blocks[1:], bids, side="right", method="compare_all"), 0, s_max - 1)
    seq = seq.astype(jnp.int32)
    return QueryBlocks(n, cu, q_lens, jnp.clip(kv_lens.astype(jnp.int32), 0, max_kv_len), cu_blocks, nb,
                       seq, ((bids - cu_blocks[seq]) * block_q).astype(jnp.int32), bids < cu_blocks[s_max], taken)


def token_seqs(cu_q_lens: jax.Array, num_tokens: int) -> jax.Array:  # [T] int32
    """Each token's sequence (for tokens past the last sequence: S - 1, clipped)."""
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    s_max = cu_q_lens.shape[0] - 1
    return jnp.clip(jnp.searchsorted(cu_q_lens[1:], tokens, side="right", method="compare_all"),
                    0, s_max - 1).astype(jnp.int32)


def served_tokens(blocks: QueryBlocks, tok_seq: jax.Array) -> jax.Array:  # [T] bool
    """The tokens some query block covers: not padding, and of a sequence in q_len_range.
    tok_seq [T]: token_seqs(blocks.cu_q_lens, T)."""
    tokens = jnp.arange(tok_seq.shape[0], dtype=jnp.int32)
    return (tokens < blocks.cu_q_lens[blocks.num_seqs]) & blocks.taken[tok_seq]
