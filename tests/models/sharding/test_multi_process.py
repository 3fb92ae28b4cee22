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
import pytest

from jaxengine import LLM, SamplingParams
from models import ModelConfig, random_model, save_hf_checkpoint

ROOT = Path(__file__).resolve().parents[3]
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


def _run_workers(path, mode: str) -> list[str]:
    port, n = _free_port(), 2
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.models.sharding.multi_process_worker", str(path), str(port), str(i), str(n), mode],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(n)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"worker failed:\n{out[-3000:]}\n{err[-5000:]}"
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def _tokens(out: str):
    return json.loads(next(l for l in out.splitlines() if l.startswith("TOKENS "))[7:])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_hf_checkpoint(random_model(CONFIG, jnp.float32, seed=0), path, jnp.float32)
    want = [o.outputs[0].token_ids for o in LLM(str(path), **ENGINE_ARGS).generate(PROMPTS, GREEDY, use_tqdm=False)]
    return path, want


def test_two_processes_match_one(checkpoint):
    path, want = checkpoint
    assert [_tokens(out) for out in _run_workers(path, "replicated")] == [want, want]


def test_host_loop_on_process_zero_with_a_follower(checkpoint):
    # Process 0 alone schedules and broadcasts each step; process 1 replays them.
    path, want = checkpoint
    leader, follower = _run_workers(path, "leader")
    assert _tokens(leader) == want
    steps = int(next(l for l in follower.splitlines() if l.startswith("FOLLOWED "))[9:])
    assert steps >= GREEDY.max_tokens  # the prefill step (first token) and a step per later token
