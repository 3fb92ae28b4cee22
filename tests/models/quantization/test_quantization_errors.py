"""What is refused, and that the message says where and what is supported: unknown
`quantization=` values, unsupported quantization_config methods in config.json, a pre-quantized
checkpoint with a conflicting `quantization=`, ignore lists that leave decoder linears out,
mixture-of-experts models, and kv_cache_dtype="fp8" (not implemented yet)."""

import json

import jax.numpy as jnp
import pytest

from jaxengine import LLM
from jaxengine.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS, EngineConfig
from models import load_model, random_model
from models.config import ModelConfigError
from models.quantization.scheme import QUANTIZATION_METHODS as MODEL_METHODS
from tests.models.quantization.prequantized_checkpoints import FORMATS, write_checkpoint


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct-channel")
    write_checkpoint("llama", "ct-channel", path)
    return path


def _with_quantization_config(path, qc):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))


def test_engine_arguments_list_what_is_supported():
    assert QUANTIZATION_METHODS == MODEL_METHODS and KV_CACHE_DTYPES == ("auto", "fp8")
    with pytest.raises(ValueError, match=r"quantization must be one of fp8, int8 \(or None\), got 'awq'"):
        EngineConfig(quantization="awq")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, got 'fp16'"):
        EngineConfig(kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="quantization must be one of fp8, int8"):
        random_model("tiny-llama", jnp.float32, quantization="fp4")


def test_fp8_kv_cache_is_refused_at_construction():
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not implemented yet"):
        LLM(kv_cache_dtype="fp8", progress=False)


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported; supported: fp8"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}}, "format 'pack-quantized'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int",
                                                                                      "strategy": "group"}}}},
     "weights are num_bits 4, type 'int'; supported: num_bits 8, type 'float'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "block-wise weights need activation_scheme 'dynamic'"),
])
def test_unsupported_quantization_config_names_the_file_and_method(fp8_checkpoint, tmp_path, qc, message):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(fp8_checkpoint, path)
    _with_quantization_config(path, qc)
    with pytest.raises(ModelConfigError, match=message) as info:
        load_model(path, jnp.float32)
    assert str(path / "config.json") in str(info.value)


def test_prequantized_checkpoint_with_a_conflicting_method(fp8_checkpoint):
    with pytest.raises(ValueError, match=r"is pre-quantized .*compressed-tensors.*quantization='int8' was asked"):
        load_model(fp8_checkpoint, jnp.float32, quantization="int8")
    assert load_model(fp8_checkpoint, jnp.float32, quantization="fp8").quant.method == "fp8"


def test_ignore_list_naming_a_decoder_linear_is_refused(fp8_checkpoint, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(fp8_checkpoint, path)
    _with_quantization_config(path, FORMATS["ct-channel"] | {"ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"]})
    with pytest.raises(ModelConfigError, match="leaves model.layers.1.mlp.down_proj unquantized"):
        load_model(path, jnp.float32)


def test_mixture_of_experts_is_refused():
    with pytest.raises(ValueError, match="not supported for mixture-of-experts models"):
        random_model("tiny-qwen3-moe", jnp.float32, quantization="fp8")
