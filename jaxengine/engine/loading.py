"""What an engine is built from: its device mesh, the model and its tokenizer, and the
limits they set (max_model_len, EOS ids)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxengine.config import EngineConfig
from jaxengine.engine.tokenizer import eos_token_ids, load_tokenizer
from models import PRESETS, CausalLM, ModelConfig, load_model, random_model
from models.loading.presets import model_config as config_of_model
from models.sharding import DP, TP, make_mesh

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


class LoadedModel(NamedTuple):
    config: ModelConfig
    model: CausalLM
    tokenizer: Any  # None: token ids in and out only
    eos_token_ids: tuple[int, ...]  # the model's (config.json / generation_config) and the tokenizer's


def engine_mesh(config: EngineConfig, mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh | None:
    """The [dp=1, tp] mesh one engine runs on: `mesh` checked, or built from
    config.tensor_parallel_size (None when it is 1: everything on the first device)."""
    if mesh is None and config.data_parallel_size > 1:
        raise ValueError(
            f"data_parallel_size={config.data_parallel_size}: one Engine is one replica; use jaxengine.LLM "
            "or jaxengine.engine.data_parallel.DataParallelEngine, which run one Engine per replica"
        )
    if mesh is None and config.tensor_parallel_size > 1:
        mesh = make_mesh(config.tensor_parallel_size)
    if mesh is not None and (mesh.shape[DP], mesh.shape[TP]) != (1, config.tensor_parallel_size):
        raise ValueError(f"an engine's mesh must be [dp=1, tp={config.tensor_parallel_size}], got {dict(mesh.shape)}")
    return mesh


def load_model_and_tokenizer(
    config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Any = None,
    mesh: jax.sharding.Mesh | None = None,
) -> LoadedModel:
    """`model` as given (the runner places it on the mesh), a preset's random weights, or the
    checkpoint config.model with its tokenizer (config.tokenizer, else the model dir)."""
    if model is not None:
        mcfg = model.config
        have = model.quant and model.quant.method
        if config.quantization is not None and have != config.quantization:
            raise ValueError(f"quantization={config.quantization!r}, but the model given is "
                             f"{'unquantized' if have is None else 'quantized with ' + repr(have)}")
    elif config.model in PRESETS:
        dtype = _DTYPES["bfloat16" if config.dtype == "auto" else config.dtype]
        model = random_model(config.model, dtype, seed=config.seed, mesh=mesh, quantization=config.quantization)
        mcfg = model.config
        if tokenizer is None and config.tokenizer:  # random weights, a real tokenizer (benchmarks)
            tokenizer = load_tokenizer(config.tokenizer)
    else:
        mcfg = config_of_model(config.model)  # names the presets for a name that is neither
        name = config.dtype if config.dtype != "auto" else (mcfg.torch_dtype or "bfloat16")
        if name not in _DTYPES:
            name = "bfloat16"
        model = load_model(config.model, _DTYPES[name], mesh=mesh, quantization=config.quantization)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(config.tokenizer or config.model)
            except (FileNotFoundError, ValueError, OSError) as e:
                log.warning("no tokenizer (%s): token ids in and out only", e)
    if model.quant is not None:
        log.info("quantization %s (%s matmuls): q/k/v, o, gate/up and down in %s with per-channel scales; "
                 "embeddings, norms and lm_head unquantized", model.quant.method, model.quant.path.value,
                 model.quant.weight_dtype.name)
    eos = eos_token_ids(tokenizer, mcfg.eos_token_ids) if tokenizer else tuple(mcfg.eos_token_ids)
    return LoadedModel(mcfg, model, tokenizer, eos)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """config.max_model_len, by default the model's max_position_embeddings capped at 8192."""
    max_model_len = config.max_model_len or min(model_config.max_position_embeddings, 8192)
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}; lower max_model_len"
        )
    return max_model_len
