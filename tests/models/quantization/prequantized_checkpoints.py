"""Tiny random checkpoints written in the Hub's pre-quantized FP8 formats, by torch (not by our
quantizer), with the Hub's tensor names, and the dequantized weights transformers runs as the
reference:

    fp8-block          quant_method "fp8", weight_block_size, <m>.weight_scale_inv [ceil(out/b), ceil(in/b)]
    ct-channel         compressed-tensors, weights strategy "channel", <m>.weight_scale [out, 1],
                       dynamic per-token activations (the *-FP8-dynamic checkpoints)
    ct-tensor-static   compressed-tensors, weights strategy "tensor", <m>.weight_scale [1], static
                       <m>.input_scale [1] calibrated on a forward pass (the *-FP8 checkpoints)

The block is 32 x 32 rather than the Hub's 128 x 128 so that the tiny weights have several
blocks, partial ones at the edges included; the loader reads the size from config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

FP8_MAX = 448.0
BLOCK = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
FAMILIES = {"llama": (transformers.LlamaConfig, {}), "qwen3": (transformers.Qwen3Config, dict(head_dim=32))}

_CT_WEIGHTS = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
FORMATS = {
    "fp8-block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [BLOCK, BLOCK]},
    "ct-channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": _CT_WEIGHTS | {"strategy": "channel"},
                                                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                                       "dynamic": True, "symmetric": True}}}},
    "ct-tensor-static": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                         "config_groups": {"group_0": {"targets": ["Linear"], "weights": _CT_WEIGHTS | {"strategy": "tensor"},
                                                       "input_activations": {"num_bits": 8, "type": "float",
                                                                             "strategy": "tensor", "dynamic": False,
                                                                             "symmetric": True}}}},
}
CALIBRATION = [[7, 100, 3, 45, 200, 9, 17, 250, 31, 64, 5, 128], [1, 2, 3, 4, 5, 6, 7, 8]]


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _quantize(fmt: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{suffix: tensor} as the format stores a [out, in] weight, and its dequantized value."""
    if fmt == "fp8-block":
        out, cols = w.shape
        rb, cb = -(-out // BLOCK), -(-cols // BLOCK)
        padded = torch.zeros(rb * BLOCK, cb * BLOCK)
        padded[:out, :cols] = w
        blocks = padded.reshape(rb, BLOCK, cb, BLOCK).abs().amax(dim=(1, 3))
        scale_inv = torch.where(blocks > 0, blocks / FP8_MAX, torch.ones_like(blocks))
        per_element = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:out, :cols]
        q = _to_fp8(w, per_element)
        return {"weight": q, "weight_scale_inv": scale_inv}, q.float() * per_element
    if fmt == "ct-channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [out, 1]
    else:
        scale = (w.abs().amax() / FP8_MAX).reshape(1)  # [1]
    q = _to_fp8(w, scale)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def _input_amax(hf: torch.nn.Module) -> dict[str, float]:
    """max |input| of every decoder linear over the calibration prompts (static activation scales)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, mod in hf.named_modules():
        if name.split(".")[-1] in LINEARS:
            def hook(mod, args, out, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for prompt in CALIBRATION:
            hf(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return amax


def write_checkpoint(family: str, fmt: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """Write the checkpoint to `path`; return transformers' float32 model on the dequantized weights."""
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config_cls(**(SMALL | extra)),
                                                       attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # random norms too, so the paths around the linears are checked
                p.add_(0.1 * torch.randn_like(p))
            elif name.split(".")[-2] in LINEARS:  # a spread of channel magnitudes, as trained weights have
                p.mul_(torch.exp(torch.randn(p.shape[0], 1)))
    amax = _input_amax(hf) if fmt == "ct-tensor-static" else {}
    tensors, dequantized = {}, {}
    for name, p in hf.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.split(".")[-1] in LINEARS:
            stored, dequantized[name] = _quantize(fmt, p.detach().float())
            tensors |= {f"{module}.{suffix}": t.contiguous() for suffix, t in stored.items()}
            if module in amax:
                tensors[f"{module}.input_scale"] = torch.tensor([amax[module] / FP8_MAX])
        else:
            tensors[name] = p.detach().float().contiguous()
            dequantized[name] = tensors[name]
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict() | {"architectures": [type(hf).__name__], "quantization_config": FORMATS[fmt]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf.load_state_dict(dequantized)
    # The static activation scales, for QuantizedActivations (None: per token).
    hf.fp8_input_scales = {m: a / FP8_MAX for m, a in amax.items()} if amax else None
    return hf


class QuantizedActivations:
    """While active, every decoder linear of `hf` sees its input rounded to FP8 as W8A8 does:
    per token (scale max |row| / 448) or, with `input_scales` {module: scale}, with the static
    scale (values beyond it clipped). Written with torch's own float8 cast, not ours."""

    def __init__(self, hf: torch.nn.Module, input_scales: dict[str, float] | None = None):
        self.hf, self.input_scales, self.hooks = hf, input_scales, []

    def __enter__(self):
        for name, mod in self.hf.named_modules():
            if name.split(".")[-1] in LINEARS:
                self.hooks.append(mod.register_forward_pre_hook(lambda mod, args, name=name: (self._round(name, args[0]),)))
        return self

    def _round(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.input_scales is None:
            scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        else:
            scale = torch.tensor(self.input_scales[name])
        return _to_fp8(x, scale).float() * scale

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
