"""Each family against transformers (PyTorch, CPU, float32) on small random configs saved
with save_pretrained: prompt logits within 1e-4 relative, and 32 greedy tokens identical."""

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp

from models import load_model
from tests.models.llama.paged_greedy import greedy, prompt_logits

_SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

CASES = {
    "llama3.1-rope-scaling": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama3.2-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral-sliding-window": (transformers.MistralConfig, dict(sliding_window=6, head_dim=16)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict()),
    "qwen3-head-dim": (transformers.Qwen3Config, dict(head_dim=32)),  # 32 != 64 / 4
}

PROMPTS = [[5, 17, 99, 3, 200, 41, 8, 8, 120, 7, 66], [250, 1, 2], [9] * 19, [31, 4, 159, 26, 53, 58, 97]]


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_and_ours(request, tmp_path_factory):
    config_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = config_cls(**(_SMALL | extra))
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random biases/norms too, so those paths are checked
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path, dtype=jnp.float32)


def test_prompt_logits_match(hf_and_ours):
    hf, ours = hf_and_ours
    got = prompt_logits(ours, PROMPTS)
    for prompt, logits in zip(PROMPTS, got):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].numpy()
        err = np.abs(logits - want).max() / np.abs(want).max()
        assert err < 1e-4, f"prompt of {len(prompt)} tokens: relative logit error {err:.2e}"


def test_greedy_matches_generate(hf_and_ours):
    hf, ours = hf_and_ours
    got = greedy(ours, PROMPTS, 32)
    for prompt, tokens in zip(PROMPTS, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert tokens == want[0, len(prompt):].tolist()
