"""QuantizedLinear: the model's Linear (y = x W^T + b, W [*out, in] as Hugging Face stores it)
with an 8-bit weight and a float32 scale per output channel. Parameters:

    weight        [*out, in]  float8_e4m3fn or int8 (QuantScheme.weight_dtype)
    weight_scale  [*out]      float32: W ~ weight * weight_scale[..., None]
    input_scale   []          float32, only with a checkpoint's static activation scale
    bias          [*out]      the model dtype, as in Linear

`weight_scale` has the weight's axes less the contracting one, so models.sharding splits it
with the weight's output axis (a tp shard of a column-parallel layer holds its rows' scales;
row-parallel layers keep every scale on every shard). The two matmuls are functions below; which
one a layer runs is its scheme's `path` (models.quantization.scheme).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.quantization.fp8 import quantize_activations
from models.quantization.scheme import MatmulPath, QuantScheme


def _contract(x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:  # [..., in] x [*out, in] -> [..., *out]
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())), **kwargs)


def w8a8_matmul(
    x: jax.Array,  # [..., in]
    weight: jax.Array,  # [*out, in] float8_e4m3fn
    weight_scale: jax.Array,  # [*out] f32
    input_scale: jax.Array | None,  # [] f32 (static) or None (dynamic per token)
    dtype: jnp.dtype,
) -> jax.Array:  # [..., *out] in `dtype`
    """Both operands float8: one dot_general accumulating in float32 (cuBLASLt's FP8 GEMM on
    Hopper), then each output scaled by its token's scale times its channel's scale."""
    xq, x_scale = quantize_activations(x, input_scale)  # [..., in] e4m3, [...] f32
    y = _contract(xq, weight, preferred_element_type=jnp.float32)
    x_scale = x_scale.reshape(*x_scale.shape, *(1,) * (weight.ndim - 1))
    return (y * x_scale * weight_scale).astype(dtype)


def weight_only_matmul(
    x: jax.Array,  # [..., in]
    weight: jax.Array,  # [*out, in] float8_e4m3fn or int8
    weight_scale: jax.Array,  # [*out] f32
    dtype: jnp.dtype,
) -> jax.Array:  # [..., *out] in `dtype`
    """The weight converted to `dtype` inside the matmul (XLA fuses the convert into the GEMM's
    operand read), the channel scale applied to the output: x (W * s)^T = (x W^T) * s."""
    y = _contract(x.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)
    return (y * weight_scale).astype(dtype)


class QuantizedLinear(nnx.Module):
    def __init__(self, d_in: int, d_out: int | tuple[int, ...], *, bias: bool, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, scheme: QuantScheme):
        out = (d_out,) if isinstance(d_out, int) else tuple(d_out)
        # Zeros and ones: a quantized model is built abstractly and filled by the loader (or presets).
        self.weight = nnx.Param(jnp.zeros((*out, d_in), scheme.weight_dtype))
        self.weight_scale = nnx.Param(jnp.ones(out, jnp.float32))
        self.input_scale = nnx.Param(jnp.ones((), jnp.float32)) if scheme.static_input_scale else None
        self.bias = nnx.Param(jnp.zeros(out, param_dtype)) if bias else None
        self.dtype = dtype
        self.path = scheme.path

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., *out]
        w, s = self.weight[...], self.weight_scale[...]
        if self.path is MatmulPath.W8A8:
            y = w8a8_matmul(x, w, s, None if self.input_scale is None else self.input_scale[...], self.dtype)
        else:
            y = weight_only_matmul(x, w, s, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
