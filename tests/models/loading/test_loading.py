"""Checkpoint loading: sharded index, dtype conversion, orbax round trip, and the errors a
user gets for a bad checkpoint."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import ModelConfig, load_model, restore_params, save_hf_checkpoint, save_params
from models.loading.loader import param_name
from flax import nnx

_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _params(model) -> dict[str, np.ndarray]:
    return {param_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(model)[1])}


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_index_loads_same_weights(hf_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    single, sharded = _params(load_model(hf_dir, jnp.float32)), _params(load_model(tmp_path, jnp.float32))
    assert single.keys() == sharded.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], sharded[name])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_converted_to_requested_dtype(hf_dir, dtype):
    params = _params(load_model(hf_dir, dtype))
    assert {p.dtype for p in params.values()} == {jnp.dtype(dtype)}
    want = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(params["model.embed_tokens.weight"].astype(np.float32), want, rtol=1e-2, atol=1e-3)


def test_orbax_round_trip(hf_dir, tmp_path):
    model = load_model(hf_dir, jnp.bfloat16)
    save_params(model, tmp_path / "orbax")
    restored = restore_params(model.config, tmp_path / "orbax", jnp.bfloat16)
    a, b = _params(model), _params(restored)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_save_hf_checkpoint_loads_in_transformers(hf_dir, tmp_path):
    model = load_model(hf_dir, jnp.float32)
    save_hf_checkpoint(model, tmp_path, dtype=jnp.float32)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), original(ids).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_architecture(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*supported: LlamaForCausalLM"):
        load_model(path)


def test_unsupported_rope_scaling():
    cfg = dict(_SMALL, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"unsupported rope scaling type 'yarn'; supported: default, linear, llama3"):
        ModelConfig.from_hf_dict(cfg)


def test_missing_weight_files(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        load_model(path)


def test_missing_shard_named_in_index(hf_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="named in the index is missing"):
        load_model(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_wrong_tensor_shape(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the file holds 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 64\).*expected \(32, 80\)"):
        load_model(path)


def test_missing_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="model.layers.2.input_layernorm.weight"):
        load_model(path)


def test_missing_part_of_a_fused_weight(hf_dir, tmp_path):
    """q/k/v load into one fused parameter; a missing k_proj is named as the checkpoint names it."""
    from models.loading.safetensors import SafetensorsCheckpoint, save_safetensors

    ckpt = SafetensorsCheckpoint(hf_dir)
    dst = tmp_path / "ckpt"
    dst.mkdir()
    shutil.copy(hf_dir / "config.json", dst / "config.json")
    save_safetensors({k: np.asarray(ckpt[k]) for k in ckpt.keys() if k != "model.layers.1.self_attn.k_proj.weight"},
                     dst / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.weight"):
        load_model(dst)


def test_heads_not_divisible():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        ModelConfig.from_hf_dict(dict(_SMALL, architectures=["LlamaForCausalLM"], num_key_value_heads=3))
