"""A quantized array (8-bit values and their float32 per-row scales) and the row-scale and
dequantize arithmetic that fp8 and int8 share, on the host (numpy, at load) or the device."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Quantized(NamedTuple):
    """8-bit values and the float32 scale that multiplies them back: values [*lead, K],
    scale [*lead] (one per row; reduced over the last axis)."""

    values: np.ndarray | jax.Array
    scale: np.ndarray | jax.Array


def array_module(x):
    return jnp if isinstance(x, jax.Array) else np


def row_scale(x: np.ndarray | jax.Array, qmax: float) -> np.ndarray | jax.Array:  # [*lead, K] -> [*lead] f32
    """max |x| over the last axis / qmax; 1 for an all-zero row (any scale represents it)."""
    xp = array_module(x)
    amax = xp.max(xp.abs(x.astype(xp.float32)), axis=-1)
    return xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)


def dequantize(values: np.ndarray | jax.Array, scale: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """values [*lead, K] * scale [*lead] in float32 (fp8 or int8 values)."""
    xp = array_module(values)
    return values.astype(xp.float32) * xp.asarray(scale, xp.float32)[..., None]
