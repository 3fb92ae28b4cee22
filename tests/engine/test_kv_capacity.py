import numpy as np
import pytest

from jaxengine.kv_capacity import dtype_num_bytes, kv_bytes_per_token, num_blocks_for_budget


def test_bytes_per_token_from_hf_config():
    llama_1b = {"num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "hidden_size": 2048}
    # K and V: 2 * 16 layers * 8 heads * 64 dims * 2 bytes.
    assert kv_bytes_per_token(llama_1b) == 2 * 16 * 8 * 64 * 2 == 32768
    # Explicit head_dim wins over hidden_size // heads (Qwen3); MHA falls back to num heads.
    qwen3 = dict(llama_1b, head_dim=128)
    assert kv_bytes_per_token(qwen3, dtype="float32") == 2 * 16 * 8 * 128 * 4
    mha = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert kv_bytes_per_token(mha, dtype=np.float16) == 2 * 2 * 4 * 16 * 2


def test_bytes_per_token_from_keywords_and_errors():
    assert kv_bytes_per_token(num_layers=2, num_kv_heads=2, head_dim=4, dtype=1) == 32
    with pytest.raises(ValueError, match="num_kv_heads must be an integer >= 1, got None"):
        kv_bytes_per_token(num_layers=2, head_dim=4)
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int3'"):
        dtype_num_bytes("int3")
    assert dtype_num_bytes("bf16") == dtype_num_bytes("torch.bfloat16") == 2


def test_num_blocks_for_budget():
    assert num_blocks_for_budget(1 << 30, 16, 32768) == 2048
    assert num_blocks_for_budget(1_000_000, 16, 1000) == 62  # floor
    with pytest.raises(ValueError, match="need at least 2"):
        num_blocks_for_budget(16 * 1000, 16, 1000)
