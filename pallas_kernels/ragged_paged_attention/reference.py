"""Pure-jnp ragged paged attention: the reference every kernel is checked against, and
the XLA fallback the models use where no GPU kernel runs (CPU, tests).

The ragged batch: the step's tokens of all sequences are flattened into q[T]; sequence s
owns rows cu_q_lens[s]:cu_q_lens[s+1] and its K/V lives in the pages page_indices[s]
(cache layout: see `pallas_kernels.kv_cache`). Query i of sequence s sits at absolute
position kv_lens[s] - q_len[s] + i and attends causally to keys 0..that position (and only
the last `sliding_window` of them when set). kv_lens already include the step's new tokens.
Rows of sequences >= num_seqs and padding rows past cu_q_lens[num_seqs] produce zeros.
"""

import jax
import jax.numpy as jnp


def ragged_paged_attention_reference(
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
) -> jax.Array:  # [T, Hq, D]
    t, hq, d = q.shape
    _, hkv, _, page_size, _ = kv_cache.shape
    s_max, p = page_indices.shape
    num_seqs = jnp.reshape(num_seqs, ())

    # Which sequence each row belongs to, and its absolute position.
    rows = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)  # [T]
    valid_row = (seq < num_seqs) & (rows < cu_q_lens[jnp.minimum(num_seqs, s_max)])
    seq = jnp.minimum(seq, s_max - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])  # [T]

    # Gather each row's context: [Hkv, T, P * page_size, D].
    def context(kv):  # kv: [Hkv, num_pages, page_size, D]
        return kv[:, page_indices[seq]].reshape(hkv, t, p * page_size, d)

    k, v = context(kv_cache[0]), context(kv_cache[1])
    group = hq // hkv
    qg = q.reshape(t, hkv, group, d).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # the spec: true fp32 (GPUs would use TF32 otherwise)
    scores = jnp.einsum("thgd,htkd->thgk", qg, k.astype(jnp.float32), precision=hi) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)

    k_pos = jnp.arange(p * page_size, dtype=jnp.int32)
    mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    mask &= valid_row[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    # Rows with nothing to attend to (padding) get zeros instead of NaN.
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(mask[:, None, None, :], jnp.exp(scores - m), 0.0)
    denom = jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    # Unused pages may hold NaN/garbage: zero-weight entries must not turn into 0 * NaN.
    v32 = jnp.where(mask[None, :, :, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("thgk,htkd->thgd", w / denom, v32, precision=hi)
    return out.reshape(t, hq, d).astype(q.dtype)
