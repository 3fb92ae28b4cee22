"""On-device sampler (jaxengine/sample/sampler.py) against numpy references, on CPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.sample.metadata import SamplingTensors, neutral_sampling_tensors, seed_to_words
from jaxengine.sample.sampler import apply_penalties_and_bias, gumbel_noise, sample

NEG_INF = -np.inf
# most tests share these shapes so the jitted sampler compiles few variants (CPU compile dominates)
S0, V0, B0, L0, K0 = 32, 128, 4, 16, 3  # mixed-parameter batches
NF, VF, BF = 3000, 32, 2  # many draws of one distribution
_sample = jax.jit(sample, static_argnames=("num_logprobs", "use_top_k_top_p", "use_penalties", "all_greedy"))
_process = jax.jit(apply_penalties_and_bias, static_argnames=("use_penalties",))


# ----------------------------------------------------------------------------- helpers


def np_tensors(S: int, B: int = 1, L: int = 1, **fields) -> dict[str, np.ndarray]:
    """Neutral numpy fields for S rows, overridden by `fields` (scalars broadcast)."""
    t = {k: np.array(v) for k, v in dataclasses.asdict(neutral_sampling_tensors(S, B, L)).items()}
    for k, v in fields.items():
        v = np.asarray(v)
        t[k] = np.broadcast_to(v, t[k].shape).astype(t[k].dtype).copy() if v.ndim <= t[k].ndim else v
    return t


def to_jax(t: dict[str, np.ndarray]) -> SamplingTensors:
    return SamplingTensors(**{k: jnp.asarray(v) for k, v in t.items()})


def np_penalties_and_bias(logits: np.ndarray, t: dict[str, np.ndarray]) -> np.ndarray:
    """vLLM V1 reference: logit bias (dict-like, duplicate ids add), then penalties."""
    out = logits.astype(np.float32).copy()
    S, V = out.shape
    for r in range(S):
        for i, v in zip(t["logit_bias_ids"][r], t["logit_bias_values"][r]):
            if 0 <= i < V:
                out[r, i] = np.float32(out[r, i] + np.float32(v))
        ids, is_out = t["penalty_token_ids"][r], t["penalty_is_output"][r]
        ok = ids >= 0
        occurs = np.bincount(ids[ok], minlength=V) > 0
        out_counts = np.bincount(ids[ok & is_out], minlength=V).astype(np.float32)
        rep = np.float32(t["repetition_penalty"][r])
        x = out[r]
        x = np.where(occurs, np.where(x > 0, x / rep, x * rep), x).astype(np.float32)
        x = x - np.float32(t["frequency_penalty"][r]) * out_counts
        x = x - np.float32(t["presence_penalty"][r]) * (out_counts > 0).astype(np.float32)
        out[r] = x
    return out


def np_allowed(logits: np.ndarray, temp: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Boolean mask of tokens a random row may emit (float64; inputs are chosen away from the boundaries)."""
    x = logits.astype(np.float64) / temp
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = p >= min_p * p.max()
    if 0 < top_k < len(x):
        kth = np.sort(np.where(keep, x, -np.inf))[::-1][top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        order = np.argsort(-q, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        kept = np.zeros_like(keep)
        kept[order[before < top_p]] = True
        keep &= kept
    return keep


def random_penalty_tensors(rng: np.random.Generator, S: int, V: int, B: int, L: int) -> dict[str, np.ndarray]:
    ids = rng.integers(0, V // 3, size=(S, L))  # small id range => many repeats and prompt/output overlap
    n_valid = rng.integers(0, L + 1, size=S)
    ids = np.where(np.arange(L)[None, :] < n_valid[:, None], ids, -1)
    prompt_len = rng.integers(0, L + 1, size=S)
    is_out = (np.arange(L)[None, :] >= prompt_len[:, None]) & (ids >= 0)
    bias_ids = np.where(rng.random((S, B)) < 0.7, rng.integers(0, V, size=(S, B)), -1)
    bias_ids[0, :2] = 3  # a duplicate id: both biases add up
    return np_tensors(
        S, B, L,
        repetition_penalty=np.where(rng.random(S) < 0.7, rng.uniform(0.5, 2.0, S), 1.0),
        presence_penalty=np.where(rng.random(S) < 0.7, rng.uniform(-2, 2, S), 0.0),
        frequency_penalty=np.where(rng.random(S) < 0.7, rng.uniform(-2, 2, S), 0.0),
        penalty_token_ids=ids,
        penalty_is_output=is_out,
        logit_bias_ids=bias_ids,
        logit_bias_values=rng.uniform(-5, 5, size=(S, B)),
    )


# ----------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_including_ties():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(S0, V0)), 1).astype(np.float32)  # rounded => ties
    logits[3] = 1.0  # a whole row tied: first index
    t = np_tensors(S0, B0, L0, temperature=0.0, seeds=np.arange(S0))
    out = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=K0)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))
    # greedy ignores top-k/top-p/min-p (they never change the argmax) and the seed
    t2 = np_tensors(S0, B0, L0, temperature=0.0, top_k=3, top_p=0.2, min_p=0.5, seeds=np.arange(S0) + 99)
    out2 = _sample(jnp.asarray(logits), to_jax(t2), num_logprobs=K0)
    np.testing.assert_array_equal(np.asarray(out2.token_ids), logits.argmax(-1))


def test_greedy_with_penalties_and_bias_matches_numpy():
    rng = np.random.default_rng(1)
    S, V, B, L = S0, V0, B0, L0
    changed = 0
    for _ in range(5):
        logits = rng.normal(scale=2.0, size=(S, V)).astype(np.float32)
        t = random_penalty_tensors(rng, S, V, B, L)
        t["temperature"][:] = 0.0
        out = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=K0)
        ref = np_penalties_and_bias(logits, t).argmax(-1)
        np.testing.assert_array_equal(np.asarray(out.token_ids), ref)
        changed += int((ref != logits.argmax(-1)).sum())
    assert changed > 0  # the processing actually mattered for some rows


# ----------------------------------------------------------------------------- penalties


def test_penalties_and_bias_match_numpy_reference():
    rng = np.random.default_rng(2)
    S, V, B, L = S0, V0, B0, L0
    for _ in range(10):
        logits = rng.normal(scale=3.0, size=(S, V)).astype(np.float32)
        t = random_penalty_tensors(rng, S, V, B, L)
        got = np.asarray(_process(jnp.asarray(logits), to_jax(t)))
        np.testing.assert_allclose(got, np_penalties_and_bias(logits, t), rtol=1e-6, atol=1e-6)


def test_penalty_semantics_by_hand():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0, 0.5]], np.float32)
    # prompt: 0, 1 ; output: 2, 3, 3, 0  (-1 padding)
    t = np_tensors(
        1, 1, 8,
        repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
        penalty_token_ids=[[0, 1, 2, 3, 3, 0, -1, -1]],
        penalty_is_output=[[False, False, True, True, True, True, False, False]],
    )
    got = np.asarray(_process(jnp.asarray(logits), to_jax(t)))[0]
    want = [
        2.0 / 2 - 0.25 * 1 - 0.5,  # prompt + output once: repetition, frequency x1, presence
        -2.0 * 2,  # prompt only: repetition only
        2.0 / 2 - 0.25 - 0.5,
        -2.0 * 2 - 0.25 * 2 - 0.5,  # output twice
        1.0,
        0.5,
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- seeds


def _mixed_row(rng, V, B, L):
    """A random-sampling request row with every feature on, plus its logits."""
    logits = rng.normal(scale=2.0, size=V).astype(np.float32)
    row = dict(
        temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.3,
        presence_penalty=0.2, frequency_penalty=0.1, seeds=1234, positions=17,
        logit_bias_ids=np.r_[5, 9, np.full(B - 2, -1)], logit_bias_values=np.r_[2.0, -1.0, np.zeros(B - 2)],
        penalty_token_ids=np.r_[1, 2, 3, 2, np.full(L - 4, -1)],
        penalty_is_output=np.r_[False, False, True, True, np.zeros(L - 4, bool)],
    )
    return logits, row


def _batch_with(rng, logits_row, row, S, at, V, B, L):
    t = random_penalty_tensors(rng, S, V, B, L)  # different neighbours
    t["temperature"][:] = rng.uniform(0, 2, S)
    t["top_k"][:] = rng.integers(0, 30, S)
    t["top_p"][:] = rng.uniform(0.3, 1.0, S)
    t["seeds"][:] = rng.integers(0, 2**31, S)
    t["positions"][:] = rng.integers(0, 500, S)
    for k, v in row.items():
        v = np.asarray(v)
        if t[k].ndim == 2:  # pad the row's [B]/[L] arrays to this batch's width
            pad = np.full(t[k].shape[1] - v.shape[0], -1 if "ids" in k else 0, t[k].dtype)
            v = np.r_[v.astype(t[k].dtype), pad]
        t[k][at] = v
    logits = rng.normal(scale=2.0, size=(S, V)).astype(np.float32)
    logits[at] = logits_row
    return logits, t


def test_seeded_sampling_independent_of_batch_composition():
    rng = np.random.default_rng(3)
    V = V0
    for trial in range(6):
        logits_row, row = _mixed_row(rng, V, B0, 8)
        row["seeds"] = 1000 + trial
        results, lps = set(), []
        for S, at, B, L in [(1, 0, 4, 8), (7, 3, 9, 30), (S0, 31, B0, L0), (S0, 0, B0, L0), (S0, 13, B0, L0)]:
            logits, t = _batch_with(rng, logits_row, row, S, at, V, B, L)
            out = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=K0)
            results.add((int(out.token_ids[at]), tuple(np.asarray(out.top_ids[at]))))
            lps.append(np.r_[np.asarray(out.logprobs[at]), np.asarray(out.top_logprobs[at])])
        assert len(results) == 1, results
        # logprobs: XLA may order the softmax sum differently for another batch shape (1 ulp)
        np.testing.assert_allclose(np.stack(lps), np.broadcast_to(lps[0], (len(lps), K0 + 1)), rtol=1e-6)


def test_row_key_is_fold_in_of_seed_and_position():
    seeds = np.array([0, 7, 2**31 + 5, 4242], np.uint32)
    pos = np.array([0, 3, 11, 2**20], np.int32)
    g = np.asarray(gumbel_noise(jnp.asarray(seeds), jnp.asarray(pos), 33))
    for r in range(4):
        key = jax.random.fold_in(jax.random.PRNGKey(int(seeds[r])), int(pos[r]))
        np.testing.assert_array_equal(g[r], np.asarray(jax.random.gumbel(key, (33,))))
    # [S, 2] (hi, lo) words of a 64-bit seed: same key as the u32 form for small seeds
    words = np.array([seed_to_words(int(s)) for s in seeds], np.uint32)
    np.testing.assert_array_equal(np.asarray(gumbel_noise(jnp.asarray(words), jnp.asarray(pos), 33)), g)
    assert seed_to_words(-1) == (0xFFFFFFFF, 0xFFFFFFFF) and seed_to_words(2**40 + 5) == (256, 5)
    big = np.array([seed_to_words(2**40 + 5), seed_to_words(5)], np.uint32)
    g2 = np.asarray(gumbel_noise(jnp.asarray(big), jnp.zeros(2, jnp.int32), 33))
    assert not np.array_equal(g2[0], g2[1])  # high words matter


def test_different_seeds_and_positions_give_different_tokens():
    V, N = VF, NF
    logits = np.zeros((N, V), np.float32)  # uniform: 3000 draws over 32 tokens, ~94 each
    for field in ("seeds", "positions"):
        t = np_tensors(N, BF, **{field: np.arange(N)})
        toks = np.asarray(_sample(jnp.asarray(logits), to_jax(t)).token_ids)
        counts = np.bincount(toks, minlength=V)
        assert (counts > 0).all()  # P(some token missing) <= 32 * (31/32)^3000 ~ 1e-40
        assert counts.max() <= 150  # binomial(3000, 1/32): 150 is ~5.9 sd above the mean; P < 1e-7
    # same seed and position => same token
    t = np_tensors(N, BF, seeds=9, positions=4)
    toks = np.asarray(_sample(jnp.asarray(logits), to_jax(t)).token_ids)
    assert len(set(toks.tolist())) == 1


# ----------------------------------------------------------------------------- filters


def _config_logits(rng, V, temp, top_k, min_p, top_p_rank):
    """Ties-free logits and a top_p placed midway between two cumulative masses (no boundary ambiguity)."""
    while True:
        logits = rng.normal(scale=2.0, size=V).astype(np.float32)
        x = logits.astype(np.float64) / temp
        p = np.exp(x - x.max())
        p /= p.sum()
        ratio = p / p.max()
        if min_p > 0 and np.min(np.abs(ratio - min_p)) < 1e-3:
            continue
        keep = np_allowed(logits, temp, top_k, 1.0, min_p)
        q = np.sort(np.where(keep, p, 0.0))[::-1]
        q /= q.sum()
        c = np.cumsum(q)
        if top_p_rank is None:
            return logits, 1.0
        j = min(top_p_rank, int(keep.sum()) - 1)
        top_p = 1e-6 if j == 0 else (c[j - 1] + c[j]) / 2  # keeps exactly j+1 tokens
        if j == 0 or c[j] - c[j - 1] > 2e-3:
            return logits, float(top_p)


@pytest.mark.parametrize(
    "temp,top_k,min_p,top_p_rank",
    [
        (1.0, 1, 0.0, None),  # top_k = 1
        (1.0, 5, 0.0, None),
        (0.7, 0, 0.0, 0),  # top_p tiny
        (1.3, 0, 0.0, 6),
        (1.0, 0, 0.999, None),  # min_p near 1
        (1.5, 0, 0.05, None),
        (2.0, 12, 0.02, 4),  # all three
        (1.0, 8, 0.0, 3),
    ],
)
def test_filters_never_emit_excluded_tokens(temp, top_k, min_p, top_p_rank):
    rng = np.random.default_rng(hash((temp, top_k, min_p, top_p_rank)) % 2**32)
    V, N = VF, NF
    logits, top_p = _config_logits(rng, V, temp, top_k, min_p, top_p_rank)
    allowed = np_allowed(logits, temp, top_k, top_p, min_p)
    assert 1 <= allowed.sum() < V
    t = np_tensors(N, BF, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, positions=np.arange(N), seeds=5)
    toks = np.asarray(_sample(jnp.asarray(np.broadcast_to(logits, (N, V))), to_jax(t)).token_ids)
    emitted = np.bincount(toks, minlength=V) > 0
    assert not (emitted & ~allowed).any(), (np.flatnonzero(emitted & ~allowed), np.flatnonzero(allowed))
    # and not over-restrictive: every allowed token with renormalised prob >= 1% shows up
    p = np.exp(logits / temp - (logits / temp).max())
    p = np.where(allowed, p, 0)
    p /= p.sum()
    assert (emitted | (p < 0.01)).all()


def test_filters_per_row_in_one_batch():
    """Rows with different filters in one batch each respect their own."""
    rng = np.random.default_rng(11)
    V, R, N = VF, 4, NF // 4
    logits = rng.normal(scale=2.0, size=(R, V)).astype(np.float32)
    cfg = dict(temperature=[1.0, 0.5, 1.0, 1.0], top_k=[2, 0, 0, 0], top_p=[1.0, 1.0, 1.0, 1.0], min_p=[0.0, 0.0, 0.5, 0.0])
    t = np_tensors(R * N, BF, **{k: np.repeat(v, N) for k, v in cfg.items()}, positions=np.arange(R * N))
    toks = np.asarray(_sample(jnp.asarray(np.repeat(logits, N, axis=0)), to_jax(t)).token_ids).reshape(R, N)
    for r in range(R):
        allowed = np_allowed(logits[r], cfg["temperature"][r], cfg["top_k"][r], 1.0, cfg["min_p"][r])
        assert allowed[toks[r]].all()
    assert len(set(toks[3].tolist())) > 5  # the unfiltered row is not restricted


# ----------------------------------------------------------------------------- distribution


def test_temperature_sampling_matches_softmax_chi_square():
    """20k draws at T=0.7 over V=8 against softmax(logits/T).

    Pearson chi-square, 7 degrees of freedom, critical value 40.52 = chi2.isf(1e-6, 7):
    a correct sampler fails with probability 1e-6 (over the choice of seeds). Power check:
    the same draws against softmax(logits) (T=1) are rejected by a wide margin.
    """
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2], np.float32)
    N, T = 20_000, 0.7
    t = np_tensors(N, temperature=T, seeds=77, positions=np.arange(N))
    toks = np.asarray(_sample(jnp.asarray(np.broadcast_to(logits, (N, 8))), to_jax(t)).token_ids)
    counts = np.bincount(toks, minlength=8)

    def chi2(temp):
        p = np.exp(logits / temp - (logits / temp).max())
        p /= p.sum()
        return float(((counts - N * p) ** 2 / (N * p)).sum())

    assert chi2(T) < 40.52, counts
    assert chi2(1.0) > 200.0


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(5)
    S, V, B, L, K = S0, V0, B0, L0, K0
    logits = rng.normal(scale=3.0, size=(S, V)).astype(np.float32)
    t = random_penalty_tensors(rng, S, V, B, L)
    t["temperature"][:] = np.r_[np.zeros(3), rng.uniform(0.5, 1.5, S - 3)]
    t["top_k"][:] = 10
    t["positions"][:] = np.arange(S)
    out = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=K)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    toks = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[np.arange(S), toks], rtol=1e-6, atol=1e-6)
    top = np.argsort(-ref, axis=-1)[:, :K]
    np.testing.assert_array_equal(np.asarray(out.top_ids), top)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(ref, top, -1), rtol=1e-6, atol=1e-6)
    # processing must not leak into logprobs (penalties/bias change the chosen token's processed logprob)
    proc = np.asarray(jax.nn.log_softmax(jnp.asarray(np_penalties_and_bias(logits, t)), axis=-1))
    assert not np.allclose(np.asarray(out.logprobs), proc[np.arange(S), toks])
    empty = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=0)
    assert empty.top_ids.shape == (S, 0) and empty.top_logprobs.shape == (S, 0)


# ----------------------------------------------------------------------------- cheap paths


def test_cheap_paths_identical_on_rows_that_do_not_use_them():
    rng = np.random.default_rng(6)
    S, V, B, L = S0, V0, B0, L0
    logits = jnp.asarray(rng.normal(scale=2.0, size=(S, V)).astype(np.float32))
    t = random_penalty_tensors(rng, S, V, B, L)
    t["temperature"][:] = np.where(rng.random(S) < 0.3, 0.0, rng.uniform(0.3, 1.5, S))
    t["top_k"][:] = np.where(rng.random(S) < 0.5, rng.integers(1, 40, S), 0)
    t["top_p"][:] = np.where(rng.random(S) < 0.5, rng.uniform(0.2, 0.99, S), 1.0)
    t["min_p"][:] = np.where(rng.random(S) < 0.3, rng.uniform(0.0, 0.2, S), 0.0)
    t["seeds"][:] = rng.integers(0, 2**31, S)
    t["positions"][:] = rng.integers(0, 1000, S)
    tj = to_jax(t)
    full = _sample(logits, tj, num_logprobs=K0)
    no_filter = (t["top_k"] == 0) & (t["top_p"] >= 1.0)
    no_pen = (t["repetition_penalty"] == 1) & (t["presence_penalty"] == 0) & (t["frequency_penalty"] == 0)
    greedy = t["temperature"] < 1e-5
    assert 0 < no_filter.sum() < S and 0 < no_pen.sum() < S and 0 < greedy.sum() < S
    for kw, rows in [
        (dict(use_top_k_top_p=False), no_filter),
        (dict(use_penalties=False), no_pen),
        (dict(all_greedy=True), greedy),
    ]:
        cheap = _sample(logits, tj, num_logprobs=K0, **kw)
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cheap)):
            np.testing.assert_array_equal(np.asarray(a)[rows], np.asarray(b)[rows], err_msg=str(kw))
        # the cheap variant does skip the feature: some using row differs (sanity check of the test)
        assert (np.asarray(full.token_ids) != np.asarray(cheap.token_ids))[~rows].any() or kw.get("all_greedy")
    # processed logits: bit-identical for rows without penalties
    a = np.asarray(_process(logits, tj))
    b = np.asarray(_process(logits, tj, use_penalties=False))
    np.testing.assert_array_equal(a[no_pen], b[no_pen])


# ----------------------------------------------------------------------------- edge cases


def test_no_nan_with_masked_rows():
    S, V = 6, 40
    logits = np.full((S, V), NEG_INF, np.float32)
    logits[0, 7] = 3.0  # only token 7 alive
    logits[1, 39] = -1e4  # only the last token, very negative
    logits[2, [4, 5]] = 1.0  # two tied survivors
    logits[3] = 0.0  # all tied
    # row 4: everything -inf; row 5: finite logits, all but token 11 masked by -inf bias
    logits[5] = np.linspace(-1, 1, V)
    bias_ids = np.full((S, V), -1)
    bias_ids[5] = np.arange(V)
    bias_vals = np.zeros((S, V), np.float32)
    bias_vals[5] = NEG_INF
    bias_vals[5, 11] = 0.0
    for temp, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.0), (0.0, 0, 1.0, 0.0), (0.5, 3, 0.5, 0.1), (1.0, 1, 1e-6, 0.99)]:
        t = np_tensors(S, V, 1, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                       logit_bias_ids=bias_ids, logit_bias_values=bias_vals, positions=np.arange(S) + 3)
        for pos in range(20):
            t["positions"][:] = pos
            out = _sample(jnp.asarray(logits), to_jax(t), num_logprobs=2)
            tok = np.asarray(out.token_ids)
            assert ((tok >= 0) & (tok < V)).all()
            assert tok[0] == 7 and tok[1] == 39 and tok[2] in (4, 5) and tok[5] == 11
            for leaf in jax.tree.leaves(out):
                assert not np.isnan(np.asarray(leaf)).any()
            assert np.asarray(out.logprobs)[0] == 0.0 and np.asarray(out.logprobs)[4] == NEG_INF


def test_min_tokens_suppression_via_neg_inf_bias():
    rng = np.random.default_rng(8)
    V, N, EOS, STOP = VF, NF, 2, 9
    logits = rng.normal(size=V).astype(np.float32)
    logits[EOS] = 6.0  # EOS would dominate
    logits[STOP] = 5.0
    base = np.broadcast_to(logits, (N, V))
    t = np_tensors(N, BF, 1, positions=np.arange(N), logit_bias_ids=[EOS, STOP], logit_bias_values=[NEG_INF, NEG_INF])
    toks = np.asarray(_sample(jnp.asarray(base), to_jax(t)).token_ids)
    assert not np.isin(toks, [EOS, STOP]).any()
    t["temperature"][:] = 0.0
    toks = np.asarray(_sample(jnp.asarray(base), to_jax(t)).token_ids)
    assert (toks == np.argsort(-logits)[2]).all()
    # without the bias EOS is sampled most of the time
    t = np_tensors(N, BF, positions=np.arange(N))
    toks = np.asarray(_sample(jnp.asarray(base), to_jax(t)).token_ids)
    assert (toks == EOS).mean() > 0.5


def test_jit_with_neutral_tensors_and_bigger_vocab():
    """Warm-up shape: neutral tensors compile and sample on a realistic-ish vocab."""
    S, V = 8, 4096
    logits = jax.random.normal(jax.random.PRNGKey(0), (S, V))
    t = neutral_sampling_tensors(S, 1, 1, temperature=0.0)
    out = _sample(logits, t, num_logprobs=4)
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.asarray(jnp.argmax(logits, -1)))
    assert out.token_ids.dtype == jnp.int32 and out.logprobs.dtype == jnp.float32
