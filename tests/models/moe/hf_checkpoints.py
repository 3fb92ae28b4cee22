"""Small random MoE checkpoints written by transformers (float32), one per family, for the
parity tests: every family's switches on (norm_topk_prob both ways, a dense layer among
sparse ones, Qwen2-MoE's shared expert and qkv bias), random norms/biases and a router with
decisive weights so the top-k choice has no near-ties."""

from pathlib import Path

import torch
import transformers

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

FAMILIES = {
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)),
    "qwen2-moe": (transformers.Qwen2MoeConfig, dict(  # layer 0 dense (mlp_only_layers), layer 1 sparse
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        norm_topk_prob=False, mlp_only_layers=[0])),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
}


def build(family: str, path: Path, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        config_cls(**(SMALL | extra)), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # the router
                p.copy_(torch.randn_like(p))
    hf.save_pretrained(path)
    return hf
