"""A checkpoint that cannot be loaded says which file is wrong and how: truncated or corrupt
safetensors, a bad config.json, an unknown architecture (with the supported ones), a model
name that is neither a directory nor a preset (with the presets). Real files on disk, real
loading; the CLI's side (one line, no traceback, non-zero exit) is tests/serving/test_load_errors.py."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from models import PRESETS, ModelConfig, load_model, random_model, save_hf_checkpoint
from models.config import SUPPORTED_ARCHITECTURES, ModelConfigError, ModelNotFoundError
from models.loading.loader import MissingWeightError
from models.loading.presets import model_config, preset_config
from models.loading.safetensors import CheckpointError, SafetensorsCheckpoint, save_safetensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(random_model("tiny-llama"), path)
    return path


@pytest.fixture
def copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def _raises(exc_type, path):
    """The error load_model(path) raises, which must be an `exc_type`."""
    with pytest.raises(exc_type) as e:
        load_model(path)
    return e


def _assert_message(e, *words):
    message = str(e.value)
    for w in words:
        assert str(w) in message, (w, message)


def test_safetensors_cut_in_half(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    e = _raises(CheckpointError, copy)
    _assert_message(e, f, "truncated", f"the file has {len(data) // 2} bytes")


def test_safetensors_cut_inside_its_header(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    _assert_message(_raises(CheckpointError, copy), f, "truncated", "header needs")


def test_safetensors_shorter_than_its_length_field(copy):
    f = copy / "model.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    _assert_message(_raises(CheckpointError, copy), f, "not a safetensors file", "3 bytes")


def test_safetensors_header_not_json(copy):
    f = copy / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 64)
    _assert_message(_raises(CheckpointError, copy), f, "header is not JSON")


def test_safetensors_of_another_format(copy):
    f = copy / "model.safetensors"
    f.write_bytes(b"PK\x03\x04" + b"\xff" * 60)  # a zip (a torch .bin) renamed: an absurd header length
    _assert_message(_raises(CheckpointError, copy), f, "not a safetensors file")


def test_safetensors_entry_whose_offsets_disagree_with_its_shape(copy, checkpoint):
    ckpt = SafetensorsCheckpoint(checkpoint)
    tensors = {k: np.asarray(ckpt[k]) for k in ckpt.keys()}
    f = copy / "model.safetensors"
    save_safetensors(tensors, f)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]  # the bytes hold half of that
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    _assert_message(_raises(CheckpointError, copy), f, name, "data_offsets")


def test_index_not_json(copy, checkpoint):
    index = copy / "model.safetensors.index.json"
    index.write_text("{ not json")
    _assert_message(_raises(CheckpointError, copy), index, "not valid JSON")


def test_missing_weight_is_named_and_is_a_key_error(copy, checkpoint):
    ckpt = SafetensorsCheckpoint(checkpoint)
    save_safetensors({k: np.asarray(ckpt[k]) for k in ckpt.keys() if k != "model.norm.weight"},
                     copy / "model.safetensors")
    e = _raises(MissingWeightError, copy)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("weight 'model.norm.weight' is missing from the checkpoint in")


def test_config_not_json(copy):
    (copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    e = _raises(ModelConfigError, copy)
    _assert_message(e, copy / "config.json", "not valid JSON", "line 1")


def test_config_not_an_object(copy):
    (copy / "config.json").write_text("[1, 2]")
    _assert_message(_raises(ModelConfigError, copy), copy / "config.json", "JSON object", "list")


def test_config_missing_required_field(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["hidden_size"], cfg["num_hidden_layers"]
    (copy / "config.json").write_text(json.dumps(cfg))
    _assert_message(_raises(ModelConfigError, copy), copy / "config.json", "missing required field(s)",
                    "hidden_size", "num_hidden_layers")


def test_config_field_of_the_wrong_type(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (copy / "config.json").write_text(json.dumps(cfg))
    _assert_message(_raises(ModelConfigError, copy), copy / "config.json")


def test_unknown_architecture_lists_the_supported(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (copy / "config.json").write_text(json.dumps(cfg))
    e = _raises(ModelConfigError, copy)
    _assert_message(e, copy / "config.json", "GPT2LMHeadModel", *SUPPORTED_ARCHITECTURES)


def test_generation_config_not_json(copy):
    (copy / "generation_config.json").write_text("eos_token_id: 3")
    with pytest.raises(ModelConfigError, match="generation_config.json is not valid JSON"):
        ModelConfig.from_pretrained(copy)


def test_unknown_preset_or_missing_directory_lists_the_presets(tmp_path):
    for name in ("llama-3.2-1bb", str(tmp_path / "nowhere")):
        with pytest.raises(ModelNotFoundError) as e:
            model_config(name)
        assert isinstance(e.value, FileNotFoundError)
        _assert_message(e, repr(name), "neither a checkpoint directory", "presets:", *PRESETS)
    with pytest.raises(ValueError) as e:
        preset_config("llama-3.2-1bb")
    _assert_message(e, "llama-3.2-1bb", *PRESETS)


def test_a_directory_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}"):
        model_config(str(tmp_path))


def test_presets_and_good_checkpoints_still_resolve(checkpoint):
    assert model_config("tiny-llama") is PRESETS["tiny-llama"]
    assert model_config(str(checkpoint)).num_layers == PRESETS["tiny-llama"].num_layers
