"""The MoE presets have the published models' shapes (parameter counts, total and active),
and a tiny one builds random weights and runs a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CausalLM, preset_config, random_model
from tests.models.llama.paged_greedy import prompt_logits


def _params(cfg) -> tuple[int, int]:
    """(total, active per token): all parameters, and those a token touches (k of E experts)."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = experts = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(abstract))[0]:
        n = int(np.prod(leaf.shape))
        total += n
        experts += n if "experts" in jax.tree_util.keystr(path) else 0
    moe = cfg.moe
    return total, total - experts + experts * moe.num_experts_per_tok // moe.num_experts


@pytest.mark.parametrize("name, total, active", [("qwen3-30b-a3b", 30.5e9, 3.3e9), ("mixtral-8x7b", 46.7e9, 12.9e9)])
def test_published_parameter_counts(name, total, active):
    got_total, got_active = _params(preset_config(name))
    assert abs(got_total / total - 1) < 0.01 and abs(got_active / active - 1) < 0.02, (got_total, got_active)


def test_tiny_moe_preset_runs():
    model = random_model("tiny-qwen3-moe", dtype=jnp.float32)
    (logits,) = prompt_logits(model, [[3, 1, 4, 1, 5, 9, 2, 6]])
    assert logits.shape == (8, 512) and np.isfinite(logits).all() and logits.std() > 0
