"""Flax models of the Llama family and its mixture-of-experts relatives (Mixtral, Qwen2/3-MoE),
loaded from Hugging Face checkpoints."""

from models.attention_metadata import AttentionMetadata
from models.config import SUPPORTED_ARCHITECTURES, ModelConfig, MoeConfig, RopeScaling
from models.llama.model import CausalLM
from models.loading.loader import load_model, restore_params, save_hf_checkpoint, save_params
from models.loading.presets import PRESETS, preset_config, random_model
from models.sharding import make_mesh

__all__ = [
    "AttentionMetadata", "CausalLM", "ModelConfig", "MoeConfig", "PRESETS", "RopeScaling", "SUPPORTED_ARCHITECTURES",
    "load_model", "make_mesh", "preset_config", "random_model", "restore_params", "save_hf_checkpoint", "save_params",
]
