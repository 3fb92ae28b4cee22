"""One MoE block against transformers' own block with the same weights, on uneven routing:
a router that sends most tokens to the first k experts, one token to the next k and none to
the rest; the bucket's padding tokens reach no expert. Also: a checkpoint in transformers-5's
fused in-memory layout (`mlp.experts.gate_up_proj`) loads the same parameters as the
per-expert files save_pretrained writes."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

from models import load_model
from models.moe.dispatch import sort_by_expert
from models.moe.router import route
from tests.models.moe.hf_checkpoints import FAMILIES, build

T, REAL = 13, 10  # tokens in the step, of which real (the rest: bucket padding)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, path)
    return request.param, path, hf, load_model(path, dtype=jnp.float32)


def _uneven_router(num_experts: int, k: int, hidden: int) -> np.ndarray:
    """Feature 0 decides: tokens with x[0] > 0 pick experts 0..k-1, with x[0] < 0 experts k..2k-1."""
    rng = np.random.default_rng(0)
    w = 0.01 * rng.standard_normal((num_experts, hidden)).astype(np.float32)
    for e in range(num_experts):
        w[e, 0] = 2.0 - 0.3 * e if e < k else -2.0 + 0.3 * (e - k)
    return w


@pytest.mark.parametrize("odd_token", [True, False])
def test_uneven_routing_matches_transformers_block(family, odd_token):
    _, _, hf, ours = family
    hf_block = hf.model.layers[1].mlp
    block = ours.model.layers[1].mlp
    e, k, h = block.num_experts, block.top_k, hf.config.hidden_size
    w = _uneven_router(e, k, h)
    block.gate.weight.set_value(jnp.asarray(w))
    with torch.no_grad():
        hf_block.gate.weight.copy_(torch.from_numpy(w))
    x = np.random.default_rng(1).standard_normal((T, h)).astype(np.float32)
    x[:, 0] = 3.0
    if odd_token:
        x[4, 0] = -3.0  # the one token for experts k..2k-1

    routing = route(block.gate(jnp.asarray(x[:REAL])), k, block.norm_topk_prob)
    sizes = np.asarray(sort_by_expert(routing, e).group_sizes)
    assert sizes[:k].tolist() == [REAL - odd_token] * k and sizes[k:2 * k].tolist() == [int(odd_token)] * min(k, e - k)
    assert (sizes[2 * k:] == 0).all() and ((sizes == 0).any() or (odd_token and e <= 2 * k))

    with torch.no_grad():
        want = hf_block(torch.from_numpy(x)[None])[0].numpy()
    got = np.asarray(block(jnp.asarray(x), jnp.asarray(REAL, jnp.int32)))
    np.testing.assert_allclose(got[:REAL], want[:REAL], rtol=1e-5, atol=1e-6)
    # Padding tokens reach no expert: what is left of them is the shared expert alone (Qwen2-MoE).
    shared = 0.0
    if block.shared_expert is not None:
        xp = jnp.asarray(x[REAL:])
        shared = np.asarray(jnp.asarray(1 / (1 + np.exp(-np.asarray(block.shared_expert_gate(xp))))) * block.shared_expert(xp))
    np.testing.assert_allclose(got[REAL:], shared, rtol=1e-5, atol=1e-6)


def test_fused_layout_loads_the_same_parameters(family, tmp_path):
    name, path, hf, ours = family
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(path / "config.json", fused / "config.json")
    state = {n: t.contiguous() for n, t in hf.state_dict().items()}
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in state), "transformers keeps experts fused in memory"
    safetensors.torch.save_file(state, fused / "model.safetensors")
    again = load_model(fused, dtype=jnp.float32)
    for a, b in zip(ours.model.layers, again.model.layers):
        if hasattr(a.mlp, "experts"):
            for p in ("gate_up_proj", "down_proj"):
                np.testing.assert_array_equal(getattr(a.mlp.experts, p)[...], getattr(b.mlp.experts, p)[...])
            np.testing.assert_array_equal(a.mlp.gate.weight[...], b.mlp.gate.weight[...])
