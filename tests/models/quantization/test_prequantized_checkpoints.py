"""Pre-quantized FP8 checkpoints (fp8 block-wise, compressed-tensors per channel, per tensor with
static input scales; written by tests/models/quantization/prequantized_checkpoints.py) load as
published and run as FP8, checked against transformers (float32, CPU) on the DEQUANTIZED weights.

What is compared, and why it is honest:

- Greedy tokens with the weight-only matmul path (`matmul_path="weight_only"`, float32): the
  engine then computes exactly the dequantized model, so its 24 greedy tokens must be
  transformers' with the tie rule (a divergence only where the reference's top-2 logit margin is
  below 1e-4). With the engine's default W8A8 path the activations are quantized too, which the
  dequantized-weights reference does not do, so tokens may legitimately differ there.
- Block-wise scales are converted at load to per-channel scales (dequantize, re-quantize:
  models.loading.quantized_weights), one extra e4m3 rounding. For that format the loaded weights
  are first checked against the checkpoint's dequantized weights within that rounding bound, and
  the greedy reference is transformers on the weights as loaded (dequantized, unfused): the
  format is read right if the first holds, the model runs them right if the second does.
- The default W8A8 path against transformers on the same dequantized weights with every decoder
  linear's input rounded to FP8 by torch (`QuantizedActivations`: per token, or the checkpoint's
  static scales): the same arithmetic in another implementation, so prompt logits agree to 1e-3
  of the largest logit (float32 summation order can flip an activation's rounding; a wrong scale
  or layout is far off). And against the plain dequantized reference they differ by more than
  1e-4 there, so activations really are quantized.
"""

import numpy as np
import pytest
import torch

import jax.numpy as jnp
from flax import nnx

from models import load_model
from models.loading import fused_weights
from models.loading.loader import param_name
from models.quantization.quantized_linear import QuantizedLinear
from models.quantization.quantized import dequantize
from models.quantization.scheme import MatmulPath
from tests.models.llama.paged_greedy import greedy, prompt_logits
from tests.models.quantization.prequantized_checkpoints import FAMILIES, FORMATS, QuantizedActivations, write_checkpoint

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19, [31, 4, 159, 26, 53, 58, 97]]
NEW_TOKENS = 24
TIE_MARGIN = 1e-4


@pytest.fixture(scope="module", params=[(f, q) for f in sorted(FAMILIES) for q in sorted(FORMATS)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def checkpoint(request, tmp_path_factory):
    family, fmt = request.param
    path = tmp_path_factory.mktemp(f"{family}-{fmt}")
    return fmt, path, write_checkpoint(family, fmt, path)


def _dequantized_state(model) -> dict[str, torch.Tensor]:
    """The loaded model's weights as Hugging Face tensors, quantized linears dequantized."""
    flat = {param_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(model)[1])}
    state = {}
    for name, value in flat.items():
        if name.endswith(".weight_scale") or name.endswith(".input_scale"):
            continue
        scale = flat.get(name + "_scale")
        if scale is not None:
            value = np.asarray(dequantize(value, scale))
        state |= {k: torch.from_numpy(np.array(v, np.float32)) for k, v in fused_weights.unfuse(name, value).items()}
    return state


def _assert_greedy_matches(ours: list[list[int]], hf) -> None:
    for prompt, tokens in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        if tokens == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(tokens, want)) if a != b)
        top2 = torch.topk(out.logits[i][0], 2).values
        margin = float(top2[0] - top2[1])
        assert margin < TIE_MARGIN, (f"prompt {prompt}: token {i} is {tokens[i]}, transformers' {want[i]} "
                                     f"(top-2 margin {margin:.2e}); ours {tokens}, want {want}")


def test_loads_as_fp8_with_the_checkpoints_scheme(checkpoint):
    fmt, path, _ = checkpoint
    model = load_model(path, jnp.float32)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for layer in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert isinstance(layer, QuantizedLinear) and layer.path is MatmulPath.W8A8
        assert layer.weight[...].dtype == jnp.float8_e4m3fn
        assert layer.weight_scale[...].shape == layer.weight[...].shape[:-1]
        assert (layer.input_scale is not None) == (fmt == "ct-tensor-static")
    assert model.lm_head.weight[...].dtype == jnp.float32 and model.model.embed_tokens.weight[...].dtype == jnp.float32


def test_greedy_weight_only_matches_transformers_on_dequantized_weights(checkpoint):
    fmt, path, hf = checkpoint
    model = load_model(path, jnp.float32, matmul_path="weight_only")
    if fmt == "fp8-block":
        loaded = _dequantized_state(model)
        for name, want in hf.state_dict().items():
            got, want = loaded[name].numpy(), want.numpy()
            # One e4m3 re-rounding at the row's scale (max |row| / 448): 2^-4 relative, 2^-10 x scale below normals.
            row_scale = np.abs(got).max(-1, keepdims=True) / 448 if got.ndim == 2 else 0
            assert (np.abs(got - want) <= 2 ** -4 * np.abs(want) + 2 ** -10 * row_scale + 1e-7).all(), name
        hf.load_state_dict(loaded)
    _assert_greedy_matches(greedy(model, PROMPTS, NEW_TOKENS), hf)


def test_w8a8_prompt_logits_match_fp8_activations_in_transformers(checkpoint):
    _, path, hf = checkpoint
    got = prompt_logits(load_model(path, jnp.float32), PROMPTS)
    for prompt, logits in zip(PROMPTS, got):
        with torch.no_grad():
            plain = hf(torch.tensor([prompt])).logits[0].numpy()
            with QuantizedActivations(hf, hf.fp8_input_scales):
                want = hf(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(logits - want).max() <= 1e-3 * np.abs(want).max(), (prompt, np.abs(logits - want).max())
        assert np.abs(logits - plain).max() > 1e-4 * np.abs(plain).max()
