"""On CPU a bf16 model keeps its KV cache in float32 (XLA:CPU converts a whole bf16 operand
for every gather/scatter): same values, so the same outputs as a bf16 cache."""

from __future__ import annotations

import jax.numpy as jnp

import jaxengine.engine.core
from jaxengine import LLM, SamplingParams

ARGS = dict(dtype="bfloat16", max_model_len=64, num_kv_blocks=64, block_size=8, max_num_seqs=4,
            max_num_batched_tokens=32, progress=False)
PROMPTS = [[5, 9, 200, 31, 7], [300, 2, 2, 41, 17, 99, 100, 101, 7, 8, 9], [44]]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)


def _run(llm):
    return [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_float32_storage_gives_the_bf16_cache_outputs(monkeypatch):
    llm = LLM("tiny-llama", **ARGS)
    assert llm.engine.dtype == jnp.bfloat16 and llm.engine.kv_dtype == jnp.float32
    assert llm.engine.runner.kv_caches[0].dtype == jnp.float32
    got = _run(llm)
    monkeypatch.setattr(jaxengine.engine.core, "kv_storage_dtype", jnp.dtype)  # the bf16 cache, as before
    ref = LLM("tiny-llama", **ARGS)
    assert ref.engine.runner.kv_caches[0].dtype == jnp.bfloat16
    assert _run(ref) == got
