"""models.loading.fused_weights: the fused q/k/v and gate/up parameters against the Hugging Face
tensors they stack, whole and block by block (what one tensor-parallel device reads)."""

import numpy as np
import pytest

from models.loading import fused_weights

# (parameter, fused shape): Hkv 4, G 3, D 8, hidden 16, intermediate 12.
CASES = [
    ("model.layers.1.self_attn.qkv_proj.weight", (4, 5, 8, 16)),
    ("model.layers.1.self_attn.qkv_proj.bias", (4, 5, 8)),
    ("model.layers.1.mlp.gate_up_proj.weight", (12, 2, 16)),
    ("model.layers.1.mlp.gate_up_proj.bias", (12, 2)),
]


@pytest.mark.parametrize("name,shape", CASES)
def test_fused_parameter_stacks_its_tensors(name, shape):
    rng = np.random.default_rng(0)
    sources = fused_weights.source_shapes(name, shape)
    tensors = {s: rng.standard_normal(sh).astype(np.float32) for s, sh in sources.items()}
    fused = fused_weights.read(name, shape, tensors.__getitem__)
    assert fused.shape == shape
    # Each part is its tensor in Hugging Face's row order: q head h sits with KV head h // G.
    if "qkv" in name:
        q, k, v = tensors.values()
        g = shape[1] - 2
        assert set(sources) == {name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")}
        np.testing.assert_array_equal(fused[2, 1], q.reshape(4 * g, 8, *shape[3:])[2 * g + 1])
        np.testing.assert_array_equal(fused[2, g], k.reshape(4, 8, *shape[3:])[2])
        np.testing.assert_array_equal(fused[2, g + 1], v.reshape(4, 8, *shape[3:])[2])
    else:
        gate, up = tensors.values()
        np.testing.assert_array_equal(fused[:, 0], gate)
        np.testing.assert_array_equal(fused[:, 1], up)
    # Split back: the same tensors, the same names.
    back = fused_weights.unfuse(name, fused)
    assert back.keys() == tensors.keys()
    for s in tensors:
        np.testing.assert_array_equal(back[s], tensors[s])
    # A tensor-parallel block (a quarter of the lead axis) reads as the slice of the whole.
    block = (slice(1, 2),) + tuple(slice(None) for _ in shape[1:])
    np.testing.assert_array_equal(fused_weights.read(name, shape, tensors.__getitem__, block), fused[block])


def test_unfused_names_pass_through():
    name, w = "model.layers.0.self_attn.o_proj.weight", np.ones((4, 6))
    assert fused_weights.source_shapes(name, w.shape) == {name: (4, 6)}
    assert fused_weights.unfuse(name, w)[name] is w
    np.testing.assert_array_equal(fused_weights.read(name, w.shape, {name: w}.__getitem__, (slice(0, 2), slice(None))), w[:2])
