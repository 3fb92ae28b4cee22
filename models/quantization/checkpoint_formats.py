"""The pre-quantized checkpoint formats we load, parsed from config.json's `quantization_config`.

    quant_method "fp8", weight_block_size [128, 128]   (DeepSeek-V3, Qwen3-*-FP8)
        <module>.weight            float8_e4m3fn [out, in]
        <module>.weight_scale_inv  float32 [ceil(out / 128), ceil(in / 128)]: W = weight * scale of its block
        activation_scheme "dynamic" (the only one with blocks)
    quant_method "fp8", no weight_block_size           (per-tensor, vLLM's own FP8 serialization)
        <module>.weight_scale      float32 [] or [1];  <module>.input_scale [] or [1] when activation_scheme "static"
    quant_method "compressed-tensors", format "float-quantized"   (llm-compressor's *-FP8 / *-FP8-dynamic)
        config_groups.*.weights: num_bits 8, type "float", strategy "channel" or "tensor"
        <module>.weight            float8_e4m3fn [out, in]
        <module>.weight_scale      float32 [out, 1] (channel) or [] / [1] (tensor)
        <module>.input_scale       float32 [] / [1] when input_activations.dynamic is false (static, per tensor);
                                   dynamic per-token activations have none; no input_activations: weight-only
    ignore / ignored_layers / modules_to_not_convert: module names (or "re:<regex>") left unquantized

Anything else is a ModelConfigError naming config.json, the method and what is supported.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from models.config import ModelConfigError

SUPPORTED = ("fp8 (block-wise weight_block_size, or per-tensor)",
             "compressed-tensors (float-quantized: 8-bit float weights, per channel or per tensor)")
WEIGHT_SCALES = ("block", "channel", "tensor")


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """How a pre-quantized checkpoint stores its linears (all FP8 e4m3 weights)."""

    quant_method: str  # "fp8" | "compressed-tensors", as config.json names it
    weight_scales: str  # "block" | "channel" | "tensor"
    activations: str | None  # "dynamic" (per token), "static" (input_scale per tensor), None (weight-only)
    block_size: tuple[int, int] | None = None  # [rows, columns] of a scale block ("block" only)
    ignore: tuple[str, ...] = ()  # module names or "re:" patterns

    @property
    def scale_suffix(self) -> str:
        return ".weight_scale_inv" if self.weight_scales == "block" else ".weight_scale"

    def ignores(self, module: str) -> bool:
        """Whether config.json leaves `module` ("model.layers.0.self_attn.q_proj") unquantized."""
        for entry in self.ignore:
            if entry.startswith("re:") and re.fullmatch(entry[3:], module):
                return True
            if entry == module or module.endswith("." + entry):
                return True
        return False


def checkpoint_quantization(hf: dict[str, Any], path: Path | str) -> CheckpointQuantization | None:
    """config.json's quantization_config (None when there is none); `path` names the file in errors."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelConfigError(f"{path}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(qc, path)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, path)
    raise ModelConfigError(f"{path}: quantization_config.quant_method {method!r} is not supported; supported: "
                           f"{'; '.join(SUPPORTED)}. For other checkpoints, load the unquantized model and pass "
                           "quantization='fp8' or 'int8'")


def _ignore_list(qc: dict[str, Any], *keys: str) -> tuple[str, ...]:
    names: list[str] = []
    for key in keys:
        names += list(qc.get(key) or [])
    return tuple(names)


def _fp8(qc: dict[str, Any], path: Path | str) -> CheckpointQuantization:
    where = f"{path}: quantization_config (quant_method 'fp8')"
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ModelConfigError(f"{where}: fmt {qc['fmt']!r} is not supported; supported: 'e4m3'")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ModelConfigError(f"{where}: activation_scheme {scheme!r} is not supported; supported: dynamic, static")
    ignore = _ignore_list(qc, "ignored_layers", "modules_to_not_convert")
    block = qc.get("weight_block_size")
    if block is None:
        return CheckpointQuantization("fp8", "tensor", scheme, None, ignore)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelConfigError(f"{where}: weight_block_size must be two positive integers, got {block!r}")
    if scheme != "dynamic":
        raise ModelConfigError(f"{where}: block-wise weights need activation_scheme 'dynamic', got {scheme!r}")
    return CheckpointQuantization("fp8", "block", "dynamic", (block[0], block[1]), ignore)


def _compressed_tensors(qc: dict[str, Any], path: Path | str) -> CheckpointQuantization:
    where = f"{path}: quantization_config (quant_method 'compressed-tensors')"
    fmt = qc.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise ModelConfigError(f"{where}: format {fmt!r} is not supported; supported: float-quantized "
                               "(8-bit float weights)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ModelConfigError(f"{where}: config_groups is missing or empty")
    schemes = {_group_scheme(name, group, where) for name, group in groups.items()}
    if len(schemes) != 1:
        raise ModelConfigError(f"{where}: config_groups mix schemes {sorted(schemes, key=str)}; one FP8 scheme "
                               "for every linear is supported")
    (strategy, activations), = schemes
    return CheckpointQuantization("compressed-tensors", strategy, activations, None, _ignore_list(qc, "ignore"))


def _group_scheme(name: str, group: Any, where: str) -> tuple[str, str | None]:
    """(weight strategy, activations) of one config group, or a ModelConfigError saying what differs."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ModelConfigError(f"{where}: config_groups.{name}.weights is missing")
    w = group["weights"]
    if (w.get("num_bits"), w.get("type")) != (8, "float"):
        raise ModelConfigError(f"{where}: config_groups.{name}.weights are num_bits {w.get('num_bits')!r}, type "
                               f"{w.get('type')!r}; supported: num_bits 8, type 'float' (FP8)")
    if w.get("strategy") not in ("channel", "tensor"):
        raise ModelConfigError(f"{where}: config_groups.{name}.weights.strategy {w.get('strategy')!r} is not "
                               "supported; supported: channel, tensor")
    if w.get("symmetric") is False or w.get("dynamic") is True:
        raise ModelConfigError(f"{where}: config_groups.{name}.weights must be symmetric and static")
    a = group.get("input_activations")
    if a is None:
        return w["strategy"], None
    if (a.get("num_bits"), a.get("type")) != (8, "float"):
        raise ModelConfigError(f"{where}: config_groups.{name}.input_activations are num_bits {a.get('num_bits')!r}, "
                               f"type {a.get('type')!r}; supported: num_bits 8, type 'float' (FP8)")
    if a.get("dynamic"):
        if a.get("strategy", "token") != "token":
            raise ModelConfigError(f"{where}: dynamic input_activations strategy {a.get('strategy')!r}; supported: token")
        return w["strategy"], "dynamic"
    if a.get("strategy", "tensor") != "tensor":
        raise ModelConfigError(f"{where}: static input_activations strategy {a.get('strategy')!r}; supported: tensor")
    return w["strategy"], "static"
