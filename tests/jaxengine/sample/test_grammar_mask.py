"""The device side of structured outputs: the packed bitmask against a numpy unpacking, and the
sampler with a mask: every sampled token is allowed, and all-ones rows sample as without a mask."""

import jax.numpy as jnp
import numpy as np

from jaxengine.sample.grammar_mask import apply_token_bitmask
from jaxengine.sample.metadata import neutral_sampling_tensors
from jaxengine.sample.sampler import sample

S, V = 8, 100  # V not a multiple of 32: the last word's high bits are past the vocabulary


def _mask(rng: np.random.Generator, density: float) -> np.ndarray:  # [S, V] bool
    m = rng.random((S, V)) < density
    m[np.arange(S), rng.integers(0, V, S)] = True  # at least one allowed token per row
    return m


def _pack(allowed: np.ndarray) -> np.ndarray:  # [S, V] bool -> [S, ceil(V/32)] int32
    words = -(-V // 32)
    padded = np.zeros((S, words * 32), bool)
    padded[:, :V] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view(np.int32)


def test_apply_token_bitmask_matches_numpy():
    rng = np.random.default_rng(0)
    allowed = _mask(rng, 0.3)
    logits = rng.standard_normal((S, V)).astype(np.float32)
    got = np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(_pack(allowed))))
    np.testing.assert_array_equal(got, np.where(allowed, logits, -np.inf))


def test_sampled_tokens_are_allowed_and_all_ones_rows_unchanged():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((S, V)).astype(np.float32) * 3)
    for seed in range(20):
        t = neutral_sampling_tensors(S, temperature=0.7)
        t = t.__class__(**{**t.__dict__, "seeds": jnp.arange(S, dtype=jnp.uint32) + seed * S,
                           "top_k": jnp.full((S,), 20, jnp.int32), "top_p": jnp.full((S,), 0.9, jnp.float32)})
        allowed = _mask(rng, 0.05)
        allowed[::2] = True  # even rows unconstrained
        free = np.asarray(sample(logits, t).token_ids)
        masked = np.asarray(sample(logits, t, token_bitmask=jnp.asarray(_pack(allowed))).token_ids)
        assert allowed[np.arange(S), masked].all()
        np.testing.assert_array_equal(masked[::2], free[::2])
