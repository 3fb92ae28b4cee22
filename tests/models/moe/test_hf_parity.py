"""Each MoE family (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers (PyTorch, CPU,
float32) on small random checkpoints saved with save_pretrained: prompt logits within 1e-4
relative, 32 greedy tokens identical (a divergence accepted only where the reference's top-2
margin is under 1e-4). Uneven routing is checked block by block in test_sparse_moe_block.py."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from models import load_model
from tests.models.llama.paged_greedy import greedy, prompt_logits
from tests.models.moe.hf_checkpoints import FAMILIES, build

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19, [31, 4, 159, 26, 53, 58, 97]]
NEW = 32
TIE_MARGIN = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_and_ours(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, path)
    return hf, load_model(path, dtype=jnp.float32)


def test_prompt_logits_match(hf_and_ours):
    hf, ours = hf_and_ours
    for prompt, logits in zip(PROMPTS, prompt_logits(ours, PROMPTS)):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].numpy()
        err = np.abs(logits - want).max() / np.abs(want).max()
        assert err < 1e-4, f"prompt of {len(prompt)} tokens: relative logit error {err:.2e}"


def test_greedy_matches_generate(hf_and_ours):
    hf, ours = hf_and_ours
    for prompt, tokens in zip(PROMPTS, greedy(ours, PROMPTS, NEW)):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        diverged = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), None)
        if diverged is not None:
            top2 = torch.topk(out.logits[diverged][0], 2).values
            margin = float(top2[0] - top2[1])
            assert margin < TIE_MARGIN, f"token {diverged} differs ({tokens[diverged]} != {want[diverged]}), margin {margin:.2e}"
        else:
            assert tokens == want
