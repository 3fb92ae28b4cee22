"""Named model shapes for benchmarks and tests: random weights built directly on the
device(s), no files written."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, RopeScaling
from models.llama import CausalLM
from models.sharding import check_divisible, state_shardings

_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        "LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "llama-3.1-8b": ModelConfig(
        "LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "llama-3.1-70b": ModelConfig(
        "LlamaForCausalLM", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "qwen2.5-7b": ModelConfig(
        "Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
        qkv_bias=True, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen3-8b": ModelConfig(
        "Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
        qk_norm=True, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # Tiny shapes for CPU tests.
    "tiny-llama": ModelConfig(
        "LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, eos_token_ids=(1,),
    ),
    "tiny-qwen3": ModelConfig(
        "Qwen3ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512, qk_norm=True, eos_token_ids=(1,),
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def random_model(
    name_or_config: str | ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0,
    sharding: jax.sharding.Sharding | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> CausalLM:
    """Random weights generated on the device inside one jit (nothing staged on the host);
    with `mesh`, each parameter is generated straight into its shards (models.sharding).
    The values do not depend on the sharding."""
    cfg = preset_config(name_or_config) if isinstance(name_or_config, str) else name_or_config

    def init():
        return nnx.split(CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
    if mesh is not None:
        check_divisible(cfg, mesh)
        sharding = state_shardings(abstract, mesh)
    else:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.jit(init, out_shardings=sharding)()
    return nnx.merge(graphdef, state)
