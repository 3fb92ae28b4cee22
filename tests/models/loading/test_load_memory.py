"""Loading must not stage a second full host copy of the weights (see benchmarks/load_memory.py)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

from models import ModelConfig, random_model, save_hf_checkpoint

ROOT = Path(__file__).resolve().parents[3]


def test_peak_host_memory_below_two_copies(tmp_path):
    # ~84 MB of bf16 weights in 8 layers: no single tensor is a large share of the total.
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=8192, hidden_size=512, intermediate_size=2048,
                      num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64)
    save_hf_checkpoint(random_model(cfg, jnp.bfloat16), tmp_path, jnp.bfloat16)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "--model-dir", str(tmp_path), "--json"],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["peak_anon_increase"] / result["weight_bytes"]
    assert result["weight_bytes"] > 80e6
    assert ratio < 1.4, f"peak host memory {ratio:.2f}x the weights: a full second copy was staged"
