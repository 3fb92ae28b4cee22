"""The small building blocks, with parameters named and laid out as in Hugging Face
checkpoints (`weight` is [out, in]) so loading is a 1:1 copy with no transposes."""

import jax
import jax.numpy as jnp
from flax import nnx

from models.quantization.quantized_linear import QuantizedLinear
from models.quantization.scheme import QuantScheme

Dtype = jnp.dtype


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x W^T (+ b) with W [*out, in] as Hugging Face stores it ([out, in]); a tuple `d_out`
    keeps the parts of a fused projection on their own axes (models.loading.fused_weights)."""

    def __init__(self, d_in: int, d_out: int | tuple[int, ...], *, bias: bool, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        out = (d_out,) if isinstance(d_out, int) else tuple(d_out)
        self.weight = nnx.Param(normal_init(rngs, (*out, d_in), param_dtype))
        self.bias = nnx.Param(jnp.zeros(out, param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., *out]
        w = self.weight[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def linear(d_in: int, d_out: int | tuple[int, ...], *, bias: bool, dtype: Dtype, param_dtype: Dtype,
           rngs: nnx.Rngs, quant: QuantScheme | None = None) -> Linear | QuantizedLinear:
    """A decoder linear (q/k/v, o, gate/up, down): 8-bit when the model is quantized
    (models.quantization); embeddings, norms, lm_head and routers stay in the model dtype."""
    if quant is None:
        return Linear(d_in, d_out, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return QuantizedLinear(d_in, d_out, bias=bias, dtype=dtype, param_dtype=param_dtype, scheme=quant)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs, (vocab, dim), param_dtype))
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [...] -> [..., dim]
        return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: Dtype, param_dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        # Normalise in float32, scale after casting back, as Hugging Face does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul (models.loading.fused_weights)."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
                 quant: QuantScheme | None = None):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.gate_up_proj = linear(dim, (hidden, 2), **kw)  # [I, 2, dim]: gate and up rows side by side
        self.down_proj = linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        gate_up = self.gate_up_proj(x)  # [..., I, 2]
        return self.down_proj(jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1])
