"""Named model shapes for benchmarks and tests: random weights built directly on the
device(s), no files written."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, ModelNotFoundError, MoeConfig, RopeScaling
from models.llama.model import CausalLM
from models.quantization.fp8 import FP8_MAX
from models.quantization.int8 import INT8_MAX
from models.quantization.scheme import MatmulPath, resolve_scheme
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
    # Mixture-of-experts: 30.5B parameters, 3.3B active (8 of 128 experts a token).
    "qwen3-30b-a3b": ModelConfig(
        "Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, max_position_embeddings=40960,
        qk_norm=True, bos_token_id=151643, eos_token_ids=(151645,),
        moe=MoeConfig(num_experts=128, num_experts_per_tok=8, intermediate_size=768, norm_topk_prob=True),
    ),
    # 46.7B parameters, 12.9B active (2 of 8 experts a token).
    "mixtral-8x7b": ModelConfig(
        "MixtralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
        moe=MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=14336, norm_topk_prob=True),
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
    "tiny-qwen3-moe": ModelConfig(
        "Qwen3MoeForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512, qk_norm=True, eos_token_ids=(1,),
        moe=MoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=True),
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def model_config(model: str) -> ModelConfig:
    """What a `model` argument names: a preset's shape, or a checkpoint directory's
    config.json. Anything else raises ModelNotFoundError listing the presets, so a typo in a
    preset name reads as one."""
    if model in PRESETS:
        return PRESETS[model]
    try:
        return ModelConfig.from_pretrained(model)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"model {model!r} is neither a checkpoint directory (no such directory) nor a preset; "
            f"presets: {', '.join(PRESETS)}"
        ) from None


_STD = 0.02  # of the random matrices
_CLIP = 4.0  # quantized presets: N(0, 0.02) clipped at 4 sigma, on the grid of one fixed scale


def _fixed_scale(dtype: Any) -> float:
    return _CLIP * _STD / (FP8_MAX if jnp.dtype(dtype) == jnp.float8_e4m3fn else INT8_MAX)


def _fill(kind: str, key: jax.Array, shape: tuple[int, ...], dtype: Any, quant_dtype: Any = None) -> jax.Array:
    """`quant_dtype`: the quantized weights' dtype (for "scale" and "quantized")."""
    if kind == "scale":  # a quantized linear's per-channel scales (models.quantization.quantized_linear)
        return jnp.full(shape, _fixed_scale(quant_dtype), dtype)
    if kind == "quantized":
        q = jnp.clip(jax.random.normal(key, shape, jnp.float32), -_CLIP, _CLIP) * _STD / _fixed_scale(dtype)
        return (jnp.round(q) if jnp.dtype(dtype) == jnp.int8 else q).astype(dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(
    name_or_config: str | ModelConfig, dtype: Any = jnp.bfloat16, seed: int = 0,
    sharding: jax.sharding.Sharding | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quantization: str | None = None,
    matmul_path: MatmulPath | str | None = None,
) -> CausalLM:
    """Random weights generated on the device (nothing staged on the host): N(0, 0.02) for
    matrices, ones for norms, zeros for biases; with `mesh`, each parameter is generated
    straight into its shards (models.sharding). The values do not depend on the sharding.

    One small jitted program per parameter shape, not one for the whole model: XLA compiles
    a whole-model init of an 8B model over two GPUs for minutes; per shape, the 32 layers
    share a handful of programs that compile in seconds.

    `quantization` ("fp8", "int8"): the decoder linears hold 8-bit weights (N(0, 0.02) clipped
    at 4 sigma, exactly on the grid of one fixed per-channel scale): the shapes and the
    arithmetic of a quantized model, for benchmarks."""
    cfg = preset_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    quant = resolve_scheme(quantization, None, is_moe=cfg.moe is not None, where=f"model {cfg.architecture}",
                           path=matmul_path)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: CausalLM(cfg, dtype=dtype, quant=quant, rngs=nnx.Rngs(seed))))
    if mesh is not None:
        check_divisible(cfg, mesh)
        shardings = jax.tree.leaves(state_shardings(abstract, mesh))
    else:
        one = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = [one] * len(jax.tree.leaves(abstract))
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    root = jax.random.key(seed)
    programs: dict[tuple, Any] = {}
    leaves = []
    for i, ((path, leaf), shard) in enumerate(zip(paths, shardings)):
        name = jax.tree_util.keystr(path)
        kind = ("scale" if "weight_scale" in name else "ones" if "norm" in name or "input_scale" in name
                else "zeros" if "bias" in name else "quantized" if leaf.dtype.itemsize == 1 else "normal")
        sig = (kind, leaf.shape, leaf.dtype, shard)
        if sig not in programs:
            programs[sig] = jax.jit(functools.partial(
                _fill, kind, shape=leaf.shape, dtype=leaf.dtype, quant_dtype=quant and quant.weight_dtype),
                out_shardings=shard)
        leaves.append(programs[sig](jax.random.fold_in(root, i)))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
