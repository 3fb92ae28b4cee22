"""quantization="fp8" / "int8" through the whole engine on the shipped default model, prefix
caching off (so no cached KV computed by another run hides a difference): the prompt logprobs
really change, by far more than bf16's rounding does, and greedy tokens still mostly agree.

The references are measured in the same run: the unquantized engine in float32, and in
bfloat16 (bf16 noise: mean |delta logprob| of bf16 against float32). The quantized engines
run in float32 too, so their difference from the float32 run is the quantization's alone."""

import numpy as np
import pytest

from jaxengine import LLM, SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):", "    for i in range(",
           "def is_prime(n):", "try:\n    import threading\nexcept ImportError:"]
PARAMS = SamplingParams(max_tokens=32, temperature=0, logprobs=0, prompt_logprobs=0)
RUNS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
        "fp8": dict(dtype="float32", quantization="fp8"), "int8": dict(dtype="float32", quantization="int8")}


@pytest.fixture(scope="module")
def outputs():
    common = dict(enable_prefix_caching=False, progress=False, compilation_cache_dir="", max_model_len=256)
    return {name: LLM(**common, **args).generate(PROMPTS, PARAMS, use_tqdm=False) for name, args in RUNS.items()}


def _prompt_logprobs(outs) -> np.ndarray:  # each prompt token's logprob given the tokens before it
    return np.concatenate([[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs])


def _agreeing_fraction(outs, ref) -> float:
    """Of all greedy tokens, the share generated before the run's first divergence from `ref`."""
    same = 0
    for o, r in zip(outs, ref):
        a, b = o.outputs[0].token_ids, r.outputs[0].token_ids
        same += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / sum(len(r.outputs[0].token_ids) for r in ref)


def test_fp8_changes_logprobs_beyond_bf16_noise(outputs):
    ref = _prompt_logprobs(outputs["float32"])
    bf16_noise = np.abs(_prompt_logprobs(outputs["bfloat16"]) - ref).mean()
    fp8 = np.abs(_prompt_logprobs(outputs["fp8"]) - ref).mean()
    assert bf16_noise > 0
    assert fp8 > 3 * bf16_noise, (fp8, bf16_noise)


def test_int8_changes_logprobs(outputs):
    ref = _prompt_logprobs(outputs["float32"])
    assert np.abs(_prompt_logprobs(outputs["int8"]) - ref).mean() > 1e-3


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_greedy_tokens_mostly_agree(outputs, method):
    assert _agreeing_fraction(outputs[method], outputs["float32"]) >= 0.5
