"""Each MoE family through the whole engine on CPU against transformers float32: greedy
tokens under chunked prefill (8-token budget: prompts take several steps) and again with
prefix-cache hits, and sampled tokens' logprobs equal to the reference log-softmax at the
positions they were sampled from."""

import numpy as np
import pytest
import torch

from jaxengine import LLM, SamplingParams
from tests.models.moe.hf_checkpoints import FAMILIES, build

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19,
           [31, 4, 159, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27, 95, 2, 88, 41, 97, 16, 93, 99, 37, 51]]
NEW = 16


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, path)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS]
    llm = LLM(str(path), dtype="float32", max_model_len=128, block_size=8, max_num_seqs=4, max_num_batched_tokens=8,
              num_kv_blocks=64, progress=False)
    return hf, want, llm


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_chunked_prefill_then_prefix_hits_match_transformers(setup):
    hf, want, llm = setup
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0)
    assert _tokens(llm.generate(PROMPTS, greedy)) == want
    hits = llm.engine.stats()["prefix_cache_hits"]
    outs = llm.generate(PROMPTS, greedy)
    assert _tokens(outs) == want
    assert llm.engine.stats()["prefix_cache_hits"] > hits and any(o.num_cached_tokens > 0 for o in outs)


def test_sampled_logprobs_equal_reference_log_softmax(setup):
    hf, _, llm = setup
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=2)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0]
        ref = torch.log_softmax(logits, -1).numpy()[len(prompt) - 1:]
        for step, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            assert abs(entry[tok].logprob - ref[step, tok]) < 1e-4, (step, entry[tok].logprob, ref[step, tok])
        assert len(set(tokens)) > 1 or len(tokens) < 2  # sampled, not a greedy loop
