"""Random ragged batches over a paged KV cache, shared by the kernel and reference tests.

Pages are handed out from a random permutation; every page no sequence owns (the null
page 0 included), the tail of each sequence's last page, the block-table entries past a
sequence's pages and everything about padded sequences are poisoned, so anything that
reads outside the real context shows up in the output.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class RaggedCase:
    q: np.ndarray  # [T, Hq, D]
    kv_cache: np.ndarray  # [2, Hkv, num_pages, page_size, D]
    kv_lens: np.ndarray  # [S]
    page_indices: np.ndarray  # [S, P]
    cu_q_lens: np.ndarray  # [S + 1]
    num_seqs: np.ndarray  # [1]
    q_lens: list
    real_kv_lens: list

    def args(self):
        return (self.q, self.kv_cache, self.kv_lens, self.page_indices, self.cu_q_lens,
                self.num_seqs)


def make_case(
    q_lens,
    kv_lens,
    *,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=64,
    page_size=16,
    dtype=np.float32,
    pad_tokens=0,
    pad_seqs=0,
    extra_pages=3,
    pages_per_seq=None,
    poison=np.nan,
    seed=0,
):
    assert len(q_lens) == len(kv_lens) and all(k >= q for q, k in zip(q_lens, kv_lens))
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    s = n + pad_seqs
    need = [-(-k // page_size) for k in kv_lens]
    p = pages_per_seq or max([1, *need]) + 1
    num_pages = 1 + sum(need) + extra_pages
    t = sum(q_lens) + pad_tokens

    kv = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim))
    perm = 1 + rng.permutation(num_pages - 1)
    owned = perm[: sum(need)]
    unused = np.setdiff1d(np.arange(num_pages), owned)  # includes the null page 0
    kv[:, :, unused] = poison
    pages = rng.choice(unused, size=(s, p))  # entries past a sequence's pages: poisoned
    off = 0
    for i, (k, m) in enumerate(zip(kv_lens, need)):
        pages[i, :m] = owned[off : off + m]
        off += m
        if k % page_size:  # slots past kv_len in the last page
            kv[:, :, pages[i, m - 1], k % page_size :] = poison

    cu = np.zeros(s + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(s, np.int32)
    kvl[:n] = kv_lens
    kvl[n:] = rng.integers(1, p * page_size + 1, size=pad_seqs)  # garbage past num_seqs
    q = rng.standard_normal((t, num_q_heads, head_dim))
    with np.errstate(over="ignore", invalid="ignore"):
        kv = kv.astype(dtype)
    return RaggedCase(q.astype(dtype), kv, kvl, pages.astype(np.int32), cu,
                      np.array([n], np.int32), list(q_lens), list(kv_lens))


def naive_attention(case: RaggedCase, *, sm_scale, sliding_window=None, soft_cap=None):
    """Per-sequence float64 loop over contiguous K/V: the plainest statement of the spec."""
    t, hq, d = case.q.shape
    _, hkv, _, page_size, _ = case.kv_cache.shape
    group = hq // hkv
    out = np.zeros((t, hq, d), np.float64)
    for s, (ql, kl) in enumerate(zip(case.q_lens, case.real_kv_lens)):
        q0 = case.cu_q_lens[s]
        slots = [case.page_indices[s, i // page_size] * page_size + i % page_size
                 for i in range(kl)]
        flat = case.kv_cache.astype(np.float64).reshape(2, hkv, -1, d)
        k, v = flat[0][:, slots], flat[1][:, slots]  # [Hkv, kl, D]
        for i in range(ql):
            pos = kl - ql + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(hq):
                kh, vh = k[h // group, lo : pos + 1], v[h // group, lo : pos + 1]
                sc = kh @ case.q[q0 + i, h].astype(np.float64) * sm_scale
                if soft_cap is not None:
                    sc = soft_cap * np.tanh(sc / soft_cap)
                w = np.exp(sc - sc.max())
                out[q0 + i, h] = (w / w.sum()) @ vh
    return out


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
