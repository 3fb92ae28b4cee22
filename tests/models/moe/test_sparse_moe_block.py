"""One MoE block against transformers' own block with the same weights, on uneven routing:
a router that sends most tokens to the first k experts, one token to the next k and none to
the rest; the bucket's padding tokens reach no expert. Also: a checkpoint in transformers-5's
fused in-memory layout (`mlp.experts.gate_up_proj`) loads the same parameters as the
per-expert files save_pretrained writes."""

import shutil

import jax
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


def _dots(jaxpr) -> list:
    """Every dot_general / ragged_dot of a jaxpr, inside loops and calls too."""
    found = []
    for eqn in jaxpr.eqns:
        if "dot" in eqn.primitive.name:
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


def test_no_expert_runs_on_tokens_not_routed_to_it(family):
    """The block's matmuls, as traced: the experts' run inside the grouped GEMM's loop, one
    expert's [N, K] weight at a time; no matmul over the stacked [E, ...] expert weights
    (every expert on every token) and no ragged_dot (lowered densely off TPU). The others
    are the router's and Qwen2-MoE's shared expert (on every token by design)."""
    _, _, _, ours = family
    block = ours.model.layers[1].mlp
    x = jnp.zeros((T, block.gate.weight[...].shape[1]), jnp.float32)
    dots = _dots(jax.make_jaxpr(lambda x: block(x, jnp.asarray(REAL, jnp.int32)))(x).jaxpr)
    assert dots and all(e.primitive.name == "dot_general" for e in dots), {e.primitive.name for e in dots}
    stacked = [v.aval.shape for e in dots for v in e.invars if v.aval.ndim >= 3 and v.aval.shape[0] == block.num_experts]
    assert not stacked, stacked
    in_loop = [e for e in dots if e.invars[1].aval.shape[0] in (2 * block.experts.down_proj.shape[2], block.experts.down_proj.shape[1])]
    assert len(in_loop) >= 2  # gate/up and down, one expert at a time
