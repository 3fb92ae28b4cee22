"""The sampling defaults a checkpoint publishes in its `generation_config.json`.

vLLM's `--generation-config auto` (its default): a request's sampling fields that the
caller leaves unset take these values, the ones the model's authors recommend, and
SamplingParams' own defaults only where the file has none.
"""

from __future__ import annotations

from pathlib import Path

from models.config import ModelConfigError, read_json

# The fields vLLM takes from the file (HF's names, which are SamplingParams' too).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(folder: str | Path | None) -> dict[str, float | int]:
    """The sampling fields of `folder`/generation_config.json; {} when `folder` is not a
    directory (a preset) or has no such file; ModelConfigError naming the file when it is bad."""
    if folder is None or not Path(folder).is_dir():
        return {}
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path)
    out: dict[str, float | int] = {}
    for name in SAMPLING_FIELDS:
        value = cfg.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelConfigError(f"{path}: {name} must be a number, got {value!r}")
        out[name] = int(value) if name == "top_k" else float(value)
    return out
