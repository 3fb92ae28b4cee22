"""Multi-host readiness on one machine: 2 processes on localhost (jax.distributed, CPU
backend with gloo collectives, 2 devices each) run the engine with TP 4 across both and
produce the greedy tokens of a single-process, single-device run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp

from jaxengine import LLM, SamplingParams
from models import ModelConfig, random_model, save_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 99, 3, 200, 41], [250, 1, 2], [9] * 11]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
ENGINE_ARGS = dict(dtype="float32", max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                   num_kv_blocks=32, progress=False, compilation_cache_dir="")
CONFIG = ModelConfig("LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    save_hf_checkpoint(random_model(CONFIG, jnp.float32, seed=0), tmp_path, jnp.float32)
    port, n = _free_port(), 2
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sharding.multi_process_worker", str(tmp_path), str(port), str(i), str(n)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(n)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"worker failed:\n{out[-3000:]}\n{err[-5000:]}"
            results.append(json.loads(next(l for l in out.splitlines() if l.startswith("TOKENS "))[7:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    want = [o.outputs[0].token_ids for o in LLM(str(tmp_path), **ENGINE_ARGS).generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert results == [want, want]
