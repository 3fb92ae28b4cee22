"""The number formats and the quantized linear on random data: fp8 and int8 per-channel round
trips within their rounding bounds (on the host, as the loader runs them, and on the device),
and the two matmul paths against the float32 matmul within the error their roundings allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.quantization.fp8 import FP8_MAX, quantize_activations, quantize_fp8
from models.quantization.int8 import quantize_int8
from models.quantization.quantized import dequantize
from models.quantization.quantized_linear import QuantizedLinear, w8a8_matmul, weight_only_matmul
from models.quantization.scheme import MatmulPath, quant_scheme

# e4m3: 3 mantissa bits, so rounding to nearest is within 2^-4 relative for normal numbers;
# below the smallest normal (2^-6 after scaling) the spacing is 2^-9, so within 2^-10 * scale.
FP8_REL, FP8_SUBNORMAL = 2.0 ** -4, 2.0 ** -10


def _weights(seed: int, shape=(48, 3, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, shape[:-1] + (1,)).astype(np.float32)
    w.reshape(-1, shape[-1])[0] = 0.0  # an all-zero channel
    w.reshape(-1, shape[-1])[1, :5] = [1e-9, -1e-7, 1e-5, 3.0, -3.0]  # values far below the channel max (subnormals)
    return w


def _fp8_bound(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return FP8_REL * np.abs(x) + FP8_SUBNORMAL * scale[..., None]


@pytest.mark.parametrize("on_device", [False, True])
def test_fp8_round_trip_within_e4m3_rounding(on_device):
    w = _weights(0)
    q = quantize_fp8(jnp.asarray(w) if on_device else w)
    values, scale = np.asarray(q.values), np.asarray(q.scale)
    assert values.dtype == jnp.float8_e4m3fn and values.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == w.shape[:-1]
    nonzero = np.abs(w).max(-1) > 0
    np.testing.assert_allclose(scale[nonzero], np.abs(w).max(-1)[nonzero] / FP8_MAX, rtol=1e-6)  # channel max -> 448
    back = np.asarray(dequantize(values, scale))
    assert np.isfinite(back).all()
    assert (np.abs(back - w) <= _fp8_bound(w, scale)).all()
    assert (back.reshape(-1, w.shape[-1])[0] == 0).all()


@pytest.mark.parametrize("on_device", [False, True])
def test_int8_round_trip_within_half_a_step(on_device):
    w = _weights(1)
    q = quantize_int8(jnp.asarray(w) if on_device else w)
    values, scale = np.asarray(q.values), np.asarray(q.scale)
    assert values.dtype == np.int8 and np.abs(values.astype(np.int32)).max() <= 127
    back = np.asarray(dequantize(values, scale))
    step = np.abs(w).max(-1) / 127  # the scale of each channel
    assert (np.abs(back - w) <= step[..., None] / 2 * (1 + 1e-6)).all()


def test_activations_per_token_and_static():
    x = jnp.asarray(_weights(2, (7, 64)))
    xq, s = quantize_activations(x)
    assert xq.dtype == jnp.float8_e4m3fn and s.shape == (7,)
    assert (np.abs(np.asarray(dequantize(xq, s)) - np.asarray(x)) <= _fp8_bound(np.asarray(x), np.asarray(s))).all()
    static = jnp.asarray(0.5 / FP8_MAX, jnp.float32)  # clips everything beyond 0.5
    xq, s = quantize_activations(x, static)
    back = np.asarray(dequantize(xq, s))
    assert np.isfinite(back).all() and np.abs(back).max() <= 0.5
    np.testing.assert_array_equal(np.asarray(s), np.full(7, float(static)))


def _product_bound(x, sx, w, sw):
    """|x' w'^T - x w^T| for x' = x + dx, w' = w + dw with |dx|, |dw| within the fp8 bounds."""
    ex, ew = _fp8_bound(x, sx), _fp8_bound(w, sw)
    ax, aw = np.abs(x), np.abs(w)
    return ex @ aw.T + ax @ ew.T + ex @ ew.T


def test_w8a8_matmul_against_float32_within_fp8_error():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    w = rng.standard_normal((40, 96)).astype(np.float32) * 0.05
    q = quantize_fp8(w)
    got = np.asarray(jax.jit(w8a8_matmul, static_argnums=4)(jnp.asarray(x), jnp.asarray(q.values),
                                                            jnp.asarray(q.scale), None, jnp.float32))
    want = x @ w.T
    sx = np.abs(x).max(-1) / FP8_MAX
    bound = _product_bound(x, sx, w, q.scale) + 1e-5 * (np.abs(x) @ np.abs(w).T)  # + f32 accumulation
    assert (np.abs(got - want) <= bound).all()
    # It is an 8-bit product, not the float32 one: the error is of fp8's size, not f32's.
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-4 < rel < 2 * FP8_REL, rel


def test_weight_only_matmul_is_the_dequantized_matmul():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.standard_normal((3, 8, 64)).astype(np.float32)
    for quantize in (quantize_fp8, quantize_int8):
        q = quantize(w)
        got = np.asarray(weight_only_matmul(jnp.asarray(x), jnp.asarray(q.values), jnp.asarray(q.scale), jnp.float32))
        want = np.einsum("ti,abi->tab", x, dequantize(q.values, q.scale))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method,path", [("fp8", "w8a8"), ("fp8", "weight_only"), ("int8", "weight_only")])
def test_quantized_linear_layout_and_path(method, path):
    scheme = quant_scheme(method, path=path)
    layer = QuantizedLinear(64, (4, 3), bias=True, dtype=jnp.float32, param_dtype=jnp.float32, scheme=scheme)
    assert layer.weight[...].shape == (4, 3, 64) and layer.weight[...].dtype == scheme.weight_dtype
    assert layer.weight_scale[...].shape == (4, 3) and layer.input_scale is None
    assert layer.path is MatmulPath(path)
    w = _weights(5, (4, 3, 64))
    q = quantize_fp8(w) if method == "fp8" else quantize_int8(w)
    layer.weight[...], layer.weight_scale[...] = jnp.asarray(q.values), jnp.asarray(q.scale)
    layer.bias[...] = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 7, 64)).astype(np.float32))
    y = np.asarray(layer(x))
    want = np.einsum("nti,aci->ntac", np.asarray(x), w) + np.arange(12).reshape(4, 3)
    assert y.shape == (2, 7, 4, 3)
    tol = 2 * FP8_REL if path == "w8a8" else (FP8_REL if method == "fp8" else 1 / 127)
    assert np.abs(y - want).max() <= tol * np.abs(np.einsum("nti,aci->ntac", np.abs(np.asarray(x)), np.abs(w))).max()


def test_default_paths_and_int8_has_no_activation_path():
    assert quant_scheme("fp8").path is MatmulPath.W8A8
    assert quant_scheme("int8").path is MatmulPath.WEIGHT_ONLY
    with pytest.raises(ValueError, match="weight-only"):
        quant_scheme("int8", path="w8a8")
    with pytest.raises(ValueError, match="fp8, int8"):
        quant_scheme("int4")
