"""The sampling defaults a checkpoint publishes in its `generation_config.json`.

vLLM's `--generation-config auto` (its default): a request's sampling fields that the
caller leaves unset take these values, the ones the model's authors recommend, and
SamplingParams' own defaults only where the file has none.
"""

from __future__ import annotations

import json
from pathlib import Path

# The fields vLLM takes from the file (HF's names, which are SamplingParams' too).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(folder: str | Path | None) -> dict[str, float | int]:
    """The sampling fields of `folder`/generation_config.json; {} when `folder` is not a
    directory (a preset) or has no such file."""
    if folder is None or not Path(folder).is_dir():
        return {}
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    out: dict[str, float | int] = {}
    for name in SAMPLING_FIELDS:
        value = cfg.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
        out[name] = int(value) if name == "top_k" else float(value)
    return out
