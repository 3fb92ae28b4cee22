"""`sampling_defaults`: the sampling fields of a checkpoint's generation_config.json."""

from __future__ import annotations

import json

import pytest

from models.config import ModelConfigError
from models.loading.generation_config import sampling_defaults


def test_reads_the_sampling_fields_only(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20.0, "do_sample": True, "eos_token_id": 2, "min_p": None}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert isinstance(sampling_defaults(tmp_path)["top_k"], int)


def test_no_file_or_a_preset_has_none(tmp_path):
    assert sampling_defaults(tmp_path) == {}
    assert sampling_defaults("llama-3.2-1b") == {}
    assert sampling_defaults(None) == {}


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[0.7]", "must hold a JSON object"),
    ('{"temperature": "hot"}', "temperature must be a number, got 'hot'"),
])
def test_a_bad_file_is_named(tmp_path, text, message):
    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(ModelConfigError, match=message) as e:
        sampling_defaults(tmp_path)
    assert str(path) in str(e.value)
