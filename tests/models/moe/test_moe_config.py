"""ModelConfig.moe read from transformers' own configs: which layers are sparse (as
transformers decides when it builds the model), the expert-count field under both names,
Qwen2-MoE's qkv_bias and layer_types, and the architectures error listing the MoE families."""

import json

import pytest
import transformers

from models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from tests.models.moe.hf_checkpoints import SMALL

TINY = SMALL | dict(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def _saved(config: transformers.PreTrainedConfig) -> dict:
    """The config.json save_pretrained would write for the model."""
    return json.loads(config.to_json_string()) | {"architectures": [ARCH[config.model_type]]}


def _ours(config: transformers.PreTrainedConfig) -> ModelConfig:
    return ModelConfig.from_hf_dict(_saved(config))


@pytest.mark.parametrize("extra", [dict(decoder_sparse_step=2), dict(mlp_only_layers=[0, 3]),
                                   dict(decoder_sparse_step=2, mlp_only_layers=[1])])
@pytest.mark.parametrize("config_cls", [transformers.Qwen3MoeConfig, transformers.Qwen2MoeConfig])
def test_sparse_layers_follow_transformers(config_cls, extra):
    config = config_cls(**(TINY | extra))
    hf = transformers.AutoModelForCausalLM.from_config(config)
    want = tuple(hasattr(layer.mlp, "experts") for layer in hf.model.layers)
    assert _ours(config).moe.sparse_layers == want


def test_qwen3_moe_expert_count_under_either_name():
    saved = _saved(transformers.Qwen3MoeConfig(**TINY))
    assert "num_local_experts" in saved  # what transformers 5 writes; the Hub's configs say num_experts
    hub = {k: v for k, v in saved.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert ModelConfig.from_hf_dict(saved).moe == ModelConfig.from_hf_dict(hub).moe
    assert ModelConfig.from_hf_dict(hub).moe.num_experts == 4


def test_mixtral_renormalises_and_uses_intermediate_size():
    cfg = _ours(transformers.MixtralConfig(**(SMALL | dict(num_local_experts=8, num_experts_per_tok=2))))
    assert cfg.moe.norm_topk_prob and cfg.moe.intermediate_size == SMALL["intermediate_size"]
    assert cfg.moe.sparse_layers == (True, True) and cfg.moe.shared_expert_intermediate_size == 0


def test_qwen2_moe_switches():
    config = transformers.Qwen2MoeConfig(**(TINY | dict(shared_expert_intermediate_size=24, qkv_bias=False,
                                                         use_sliding_window=True, sliding_window=16, max_window_layers=3)))
    cfg = _ours(config)
    assert cfg.moe.shared_expert_intermediate_size == 24 and not cfg.qkv_bias
    assert cfg.sliding_windows == tuple(16 if t == "sliding_attention" else None for t in config.layer_types)
    assert cfg.sliding_windows == (16, None, 16, None)
    # transformers 5 writes sliding_window 0 (and full layer_types) when the window is off.
    off = _ours(transformers.Qwen2MoeConfig(**TINY))
    assert off.sliding_windows == (None,) * 4 and off.qkv_bias


def test_unknown_architecture_lists_the_moe_families():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict(dict(TINY, architectures=["DeepseekV3ForCausalLM"]))
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in SUPPORTED_ARCHITECTURES and arch in str(e.value)
