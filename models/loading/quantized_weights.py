"""The quantized linears' parameters (models.quantization.quantized_linear) from a checkpoint:
an unquantized one, quantized here per output channel as it loads, or a pre-quantized one read
in its published format (models.quantization.checkpoint_formats).

Each checkpoint module ("model.layers.0.self_attn.q_proj") becomes one `Quantized` (values
[out, in], per-row scale [out]); fused parameters (qkv_proj, gate_up_proj) then stack their
modules' rows through models.loading.fused_weights exactly as the unquantized weights are
stacked, the scales like biases. Conversions, all exact except the block-wise one:

    unquantized            quantized per row (fp8: e4m3 round to nearest; int8: symmetric, 127)
    per-channel [out, 1]   the checkpoint's values and scales as they are
    per-tensor  [] / [1]   the scalar repeated over the module's rows (exact: every row had it)
    block-wise (weight_scale_inv, one scale per 128 x 128 block)
                           dequantized to float32 and re-quantized per row: one cuBLASLt-friendly
                           [T, 1] x [1, N] rescale instead of a per-block epilogue, for one extra
                           e4m3 rounding of the elements whose block scale is below their row's
                           largest (bounded by the fp8 round-trip error, models.quantization.fp8)
    static input_scale     per fused parameter the largest of its modules' (they read one input)

A module is read whole (its rows' scales need every column, also on a tensor-parallel shard that
holds only some columns) and kept in a small cache while its parameter's blocks are placed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from models.config import ModelConfigError
from models.loading import fused_weights
from models.loading.safetensors import CheckpointError, SafetensorsCheckpoint
from models.quantization.checkpoint_formats import CheckpointQuantization
from models.quantization.fp8 import FP8_DTYPE, quantize_fp8
from models.quantization.int8 import quantize_int8
from models.quantization.quantized import Quantized
from models.quantization.scheme import QuantScheme

_SCALES = (".weight_scale", ".input_scale")


class QuantizedWeights:
    def __init__(self, ckpt: SafetensorsCheckpoint, scheme: QuantScheme, checkpoint: CheckpointQuantization | None,
                 model_dir: Path | str):
        self.ckpt, self.scheme, self.format, self.model_dir = ckpt, scheme, checkpoint, Path(model_dir)
        self._module = functools.lru_cache(maxsize=8)(self._read_module)

    def handles(self, name: str, dtype: np.dtype) -> bool:
        """Whether parameter `name` of this dtype is a quantized linear's."""
        return name.endswith(_SCALES) or (name.endswith(".weight") and np.dtype(dtype) == self.scheme.weight_dtype)

    def source_shapes(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The checkpoint weights behind a parameter, to check before loading (scales are
        checked against their weight when read)."""
        return {} if name.endswith(_SCALES) else fused_weights.source_shapes(name, shape)

    def read(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...] | None = None) -> np.ndarray:
        if name.endswith(".input_scale"):
            return np.asarray(max(self._input_scale(s) for s in fused_weights.source_names(name)), np.float32)
        if name.endswith(".weight_scale"):
            return fused_weights.read(name, shape, lambda s: self._module(s[: -len(".weight_scale")]).scale, index)
        return fused_weights.read(name, shape, lambda s: self._module(s[: -len(".weight")]).values, index)

    # ------------------------------------------------------------------ one checkpoint module

    def _where(self, tensor: str) -> str:
        return f"tensor {tensor!r} of the checkpoint in {self.model_dir}"

    def _tensor(self, tensor: str) -> np.ndarray:
        if tensor not in self.ckpt:
            fmt = self.format
            raise CheckpointError(f"{self._where(tensor)} is missing"
                                  + ("" if fmt is None else f" (config.json's quantization_config, quant_method "
                                     f"{fmt.quant_method!r} with {fmt.weight_scales} scales, calls for it)"))
        return self.ckpt[tensor]

    def _read_module(self, module: str) -> Quantized:
        fmt = self.format
        weight = self._tensor(module + ".weight")
        if fmt is None:  # quantize the checkpoint's weights here
            quantize = quantize_fp8 if self.scheme.method == "fp8" else quantize_int8
            return quantize(np.asarray(weight, np.float32))
        if fmt.ignores(module):
            raise ModelConfigError(
                f"{self.model_dir / 'config.json'}: quantization_config's ignore list leaves {module} unquantized; "
                "checkpoints with some decoder linears unquantized are not supported (q/k/v, o, gate/up and down "
                "all run quantized; only lm_head may be left out)")
        if weight.dtype != FP8_DTYPE:
            raise CheckpointError(f"{self._where(module + '.weight')} is {weight.dtype}, but config.json's "
                                  f"quantization_config (quant_method {fmt.quant_method!r}) says FP8 (float8_e4m3fn)")
        scale_name = module + fmt.scale_suffix
        scale = np.asarray(self._tensor(scale_name), np.float32)
        out, cols = weight.shape
        if fmt.weight_scales == "channel":
            if scale.size != out or scale.shape not in ((out,), (out, 1)):
                raise CheckpointError(f"{self._where(scale_name)} has shape {scale.shape}, expected [{out}, 1] "
                                      "(one scale per output channel)")
            return Quantized(np.asarray(weight), scale.reshape(out))
        if fmt.weight_scales == "tensor":
            if scale.size != 1:
                raise CheckpointError(f"{self._where(scale_name)} has shape {scale.shape}, expected [] or [1] "
                                      "(one scale per tensor)")
            return Quantized(np.asarray(weight), np.full(out, scale.reshape(()), np.float32))
        bn, bk = fmt.block_size
        want = (-(-out // bn), -(-cols // bk))
        if scale.shape != want:
            raise CheckpointError(f"{self._where(scale_name)} has shape {scale.shape}, expected {list(want)} "
                                  f"(one scale per {bn} x {bk} block of the [{out}, {cols}] weight)")
        per_element = np.repeat(np.repeat(scale, bn, axis=0)[:out], bk, axis=1)[:, :cols]
        return quantize_fp8(np.asarray(weight).astype(np.float32) * per_element)

    def _input_scale(self, tensor: str) -> float:
        scale = np.asarray(self._tensor(tensor), np.float32)
        if scale.size != 1:
            raise CheckpointError(f"{self._where(tensor)} has shape {scale.shape}, expected [] or [1] "
                                  "(a static per-tensor activation scale)")
        return float(scale.reshape(()))
