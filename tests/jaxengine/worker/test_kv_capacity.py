import numpy as np
import pytest

from jaxengine.worker.kv_capacity import dtype_num_bytes, kv_bytes_per_token, num_blocks_for_budget


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


def _engine_in_fresh_process(env_fraction: str | None) -> tuple[str, str]:
    """(XLA_PYTHON_CLIENT_MEM_FRACTION after building an engine, what memory_budget scales by)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, jaxengine, jaxengine.worker.kv_capacity as kc\n"
        "jaxengine.LLM('tiny-llama', gpu_memory_utilization=0.5, dtype='float32', max_model_len=32, progress=False)\n"
        "print(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'), kc.memory_budget(1000, 100, 50, 0.5))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    if env_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = env_fraction
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(out.stdout.split()[-2:])


def test_gpu_memory_utilization_becomes_the_allocator_limit():
    # A fresh process: the engine sets JAX's limit to gpu_memory_utilization of the device
    # before JAX starts, so the limit is the budget as it is (1000 * 0.96 headroom - 100 - 50).
    assert _engine_in_fresh_process(None) == ("0.5", "810")
    # The user's own limit is kept and the utilisation applies to it (1000 * 0.5 * 0.96 - 100 - 50).
    assert _engine_in_fresh_process("0.6") == ("0.6", "330")
