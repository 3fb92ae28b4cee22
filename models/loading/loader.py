"""Hugging Face checkpoint directory <-> CausalLM.

Loading builds the module abstractly (no random init), then fills each parameter straight
from the memory-mapped safetensors into its device buffer, one tensor at a time, converted to
the target dtype; q/k/v and gate/up are stacked into the model's fused parameters on the way
(models.loading.fused_weights), and split back when saving. Orbax saves/restores converted parameter states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.loading import expert_weights, fused_weights
from models.config import ModelConfig, read_json
from models.loading.quantized_weights import QuantizedWeights
from models.quantization.checkpoint_formats import checkpoint_quantization
from models.quantization.scheme import MatmulPath, QuantScheme, resolve_scheme
from models.llama.model import CausalLM
from models.sharding import check_divisible, param_sharding
from models.loading.safetensors import CheckpointError, SafetensorsCheckpoint, save_safetensors


class MissingWeightError(CheckpointError, KeyError):
    """A weight the config.json calls for that no weight file holds (a KeyError too: a name
    looked up and not found)."""

    __str__ = CheckpointError.__str__  # the message, not KeyError's quoted repr of it


def abstract_model(cfg: ModelConfig, dtype: Any = jnp.bfloat16, quant: QuantScheme | None = None) -> CausalLM:
    """The module with ShapeDtypeStruct leaves: shapes and names, no memory."""
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, quant=quant, rngs=nnx.Rngs(0)))


def param_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_model(
    model_dir: str | Path,
    dtype: Any = jnp.bfloat16,
    sharding: jax.sharding.Sharding | None = None,
    mesh: jax.sharding.Mesh | None = None,
    quantization: str | None = None,
    matmul_path: MatmulPath | str | None = None,
) -> CausalLM:
    """Load a checkpoint dir into a CausalLM whose parameters live on `sharding`'s devices
    (default: the first local device), or, with `mesh`, split over it by models.sharding's
    rules: each device receives (and the host reads from the mapped file) only its slice.

    `quantization` ("fp8", "int8"; models.quantization): the decoder linears quantized per
    output channel as they load. A checkpoint whose config.json has a quantization_config loads
    in its own FP8 format whatever `quantization` is None or "fp8". `matmul_path` overrides
    the scheme's default matmul (models.quantization.scheme.default_matmul_path)."""
    cfg = ModelConfig.from_pretrained(model_dir)
    config_path = Path(model_dir) / "config.json"
    published = checkpoint_quantization(read_json(config_path), config_path)  # a pre-quantized format, or None
    scheme = resolve_scheme(quantization, published, is_moe=cfg.moe is not None,
                            where=f"the checkpoint in {model_dir}", path=matmul_path)
    ckpt = SafetensorsCheckpoint(model_dir)
    quantized = None if scheme is None else QuantizedWeights(ckpt, scheme, published, model_dir)
    if mesh is not None:
        check_divisible(cfg, mesh)
    else:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    graphdef, state = nnx.split(abstract_model(cfg, dtype, scheme))
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, var in flat:
        name = param_name(path)
        shape, leaf_dtype = var.get_value().shape, var.get_value().dtype
        experts = expert_weights.handles(name)  # an MoE tensor, in one of its checkpoint layouts
        quant = quantized is not None and quantized.handles(name, leaf_dtype)  # a quantized linear's
        sources = (expert_weights.source_shapes(name, shape, ckpt.__contains__) if experts
                   else quantized.source_shapes(name, shape) if quant
                   else fused_weights.source_shapes(name, shape))
        for source, source_shape in sources.items():
            if source not in ckpt:
                raise MissingWeightError(f"weight {source!r} is missing from the checkpoint in {model_dir} "
                                         "(its config.json calls for it)")
            if ckpt.shape(source) != source_shape:
                raise CheckpointError(
                    f"weight {source!r} has shape {ckpt.shape(source)} in the checkpoint in {model_dir}, "
                    f"expected {source_shape} from its config.json"
                )
            if not quant and ckpt.dtype(source).itemsize == 1:  # an 8-bit tensor cast to bf16 would be garbage
                raise CheckpointError(f"weight {source!r} is {ckpt.dtype(source)} in the checkpoint in {model_dir}, "
                                      "but the model keeps it unquantized (embeddings, norms and lm_head always are): "
                                      "list it in quantization_config's ignore list only if it is stored unquantized")

        def block(index=None, name=name, shape=shape, experts=experts, quant=quant, dtype=leaf_dtype) -> np.ndarray:
            # From the memory-mapped file: a device's block is paged in when it is copied.
            if quant:
                return quantized.read(name, shape, index).astype(dtype, copy=False)
            if experts:
                return expert_weights.read(name, shape, ckpt.__contains__, ckpt.__getitem__, index).astype(dtype, copy=False)
            return fused_weights.read(name, shape, ckpt.__getitem__, index).astype(dtype, copy=False)

        if mesh is None:  # device_put frees the host copy after
            leaves.append(var.replace(jax.device_put(block(), sharding)))
        else:
            leaves.append(var.replace(jax.make_array_from_callback(
                shape, param_sharding(name, shape, mesh), block, dtype=leaf_dtype)))
    state = nnx.from_flat_state([(path, leaf) for (path, _), leaf in zip(flat, leaves)])
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(model: CausalLM, out_dir: str | Path, dtype: Any = jnp.bfloat16, extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors (HF names) that transformers loads unchanged."""
    if model.quant is not None:
        raise ValueError("writing quantized models is not supported: save the unquantized model and load it "
                         f"with quantization={model.quant.method!r}")
    config = hf_config_dict(model.config, dtype) | (extra_config or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    tensors = {}
    for p, v in nnx.to_flat_state(state):
        tensors |= fused_weights.unfuse(param_name(p), np.asarray(jax.device_get(v.get_value())).astype(dtype))
    save_safetensors(tensors, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def hf_config_dict(cfg: ModelConfig, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """A config.json for `cfg` (the inverse of ModelConfig.from_hf_dict); dense families only."""
    if cfg.moe is not None:
        raise ValueError(f"writing {cfg.architecture} (mixture-of-experts) checkpoints is not supported")
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[cfg.architecture]
    rope = {"rope_type": cfg.rope_scaling.rope_type}
    if cfg.rope_scaling.rope_type != "default":
        rope |= {"factor": cfg.rope_scaling.factor}
    if cfg.rope_scaling.rope_type == "llama3":
        rope |= {"low_freq_factor": cfg.rope_scaling.low_freq_factor, "high_freq_factor": cfg.rope_scaling.high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": [cfg.architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling.rope_type == "default" else rope,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.o_bias, "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": jnp.dtype(dtype).name,
    }


def save_params(model: CausalLM, path: str | Path) -> None:
    """Orbax checkpoint of the (converted) parameter state."""
    import orbax.checkpoint as ocp

    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), nnx.to_pure_dict(state))


def restore_params(cfg: ModelConfig, path: str | Path, dtype: Any = jnp.bfloat16,
                   quant: QuantScheme | None = None) -> CausalLM:
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model(cfg, dtype, quant))
    target = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(path).absolute(), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
