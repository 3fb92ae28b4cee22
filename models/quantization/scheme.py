"""QuantScheme: how the decoder's linear layers are quantized, and THE place where the matmul
path is chosen.

    W8A8         both operands 8-bit: the activations are quantized per token (or with the
                 checkpoint's static per-tensor scale) inside the jitted step, one dot_general
                 on the two float8 operands accumulating in float32, then the [T, 1] x [1, N]
                 rescale. The form XLA lowers to cuBLASLt's FP8 GEMM on Hopper.
    WEIGHT_ONLY  the 8-bit weight is converted to the activations' dtype inside the matmul
                 and the per-channel scale applied to the output: half (fp8, int8) the weight
                 bytes of bf16 with bf16 arithmetic, what memory-bound decode steps want and
                 GPUs without FP8 tensor cores can run.

FP8 defaults to W8A8 (the issue's target), int8 is weight-only (there is no int8 activation
path). `default_matmul_path` is the only function that decides; everything else reads
`QuantScheme.path`.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp

from models.quantization.checkpoint_formats import CheckpointQuantization

QUANTIZATION_METHODS = ("fp8", "int8")  # EngineConfig.quantization, besides None


class MatmulPath(str, enum.Enum):
    W8A8 = "w8a8"
    WEIGHT_ONLY = "weight_only"


def default_matmul_path(method: str) -> MatmulPath:
    """The matmul a quantization method runs with unless a caller picks one explicitly."""
    return MatmulPath.W8A8 if method == "fp8" else MatmulPath.WEIGHT_ONLY


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """What the model's quantized linears hold and compute: `weight` [*out, in] in
    `weight_dtype`, `weight_scale` [*out] float32 per output channel, and with
    `static_input_scale` an `input_scale` [] float32 (the checkpoint's activation scale)."""

    method: str  # "fp8" | "int8"
    path: MatmulPath
    static_input_scale: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), "
                             f"got {self.method!r}")
        if self.method == "int8" and self.path is not MatmulPath.WEIGHT_ONLY:
            raise ValueError("int8 quantization is weight-only (no int8 activation path)")

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float8_e4m3fn if self.method == "fp8" else jnp.int8)


def quant_scheme(method: str, *, path: MatmulPath | str | None = None, static_input_scale: bool = False) -> QuantScheme:
    path = default_matmul_path(method) if path is None else MatmulPath(path)
    return QuantScheme(method, path, static_input_scale and path is MatmulPath.W8A8)


def resolve_scheme(
    quantization: str | None,
    checkpoint: CheckpointQuantization | None,
    *,
    is_moe: bool,
    where: str,
    path: MatmulPath | str | None = None,
) -> QuantScheme | None:
    """The scheme a model is loaded with: the engine's `quantization` argument and the
    checkpoint's own format (vLLM's rule: with quantization None a pre-quantized checkpoint's
    method is used; a different method asked for raises). `where` names the checkpoint."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), got {quantization!r}")
    if checkpoint is not None:
        if quantization not in (None, "fp8"):
            raise ValueError(f"{where} is pre-quantized (config.json quantization_config: quant_method "
                             f"{checkpoint.quant_method!r}, FP8 weights), but quantization={quantization!r} was asked; "
                             "leave quantization unset (or 'fp8') to run it as published")
        quantization = "fp8"
        if path is None and checkpoint.activations is None:  # a weight-only (W8A16) checkpoint
            path = MatmulPath.WEIGHT_ONLY
    if quantization is None:
        return None
    if is_moe:
        raise ValueError(f"quantization={quantization!r} is not supported for mixture-of-experts models yet "
                         f"({where}): the expert weights' grouped GEMMs have no 8-bit path")
    static = checkpoint is not None and checkpoint.activations == "static"
    return quant_scheme(quantization, path=path, static_input_scale=static)
