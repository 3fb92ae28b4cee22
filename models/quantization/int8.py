"""Symmetric int8 per output channel (weight-only): w ~ q * scale with q in [-127, 127] and
scale = max |w| of the row / 127, so a weight comes back within scale / 2 (rounding to nearest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.quantization.quantized import Quantized, row_scale

INT8_MAX = 127.0  # symmetric: -128 is never used, so q and -q are both representable


def quantize_int8(x: np.ndarray | jax.Array) -> Quantized:  # [*lead, K] -> values [*lead, K] int8, scale [*lead]
    xp = jnp if isinstance(x, jax.Array) else np
    scale = row_scale(x, INT8_MAX)
    q = xp.clip(xp.round(x.astype(xp.float32) / scale[..., None]), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return Quantized(q, scale)
