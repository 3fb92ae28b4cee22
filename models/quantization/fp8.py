"""float8_e4m3fn with float32 scales: per output channel for weights, per token (or one static
per-tensor value) for activations.

e4m3fn has 3 mantissa bits and no infinities (its largest value is 448), so a value x scaled
into range by `scale` comes back as x (1 + e) with |e| <= 2^-4 when x / scale is a normal
number (>= 2^-6), and within 2^-10 * scale below that (the subnormal spacing is 2^-9).
Values are clipped to +-448 before the cast: past it the cast gives NaN, not the maximum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.quantization.quantized import Quantized, array_module, row_scale

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# Per-token activation scales never go below this: an all-zero row (padding) divides by it.
MIN_SCALE = 1e-12


def quantize_fp8(x: np.ndarray | jax.Array) -> Quantized:  # [*lead, K] -> values [*lead, K] e4m3, scale [*lead]
    """Per-row (per output channel of a [out, in] weight) symmetric quantization, on the host
    (numpy, at load) or on the device (jax)."""
    xp = array_module(x)
    scale = row_scale(x, FP8_MAX)
    q = xp.clip(x.astype(xp.float32) / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return Quantized(q, scale)


def quantize_activations(x: jax.Array, static_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [..., K] -> (values [..., K] e4m3, scale [...] f32): dynamic per-token scales, or the
    checkpoint's static per-tensor `static_scale` [] broadcast (values past it clipped)."""
    if static_scale is None:
        scale = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / FP8_MAX, MIN_SCALE)
    else:
        scale = jnp.broadcast_to(static_scale.astype(jnp.float32), x.shape[:-1])
    q = jnp.clip(x.astype(jnp.float32) / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale
