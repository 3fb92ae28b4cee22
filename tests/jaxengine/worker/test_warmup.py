"""Warm-up compiles every program before the KV cache takes its memory (on a GPU, XLA
autotunes matmuls in free device memory; a cache sized to the budget leaves none), and the
runs after the allocation reuse those executables instead of compiling again."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import pytest

from jaxengine.worker.model_runner import ModelRunner
from models import PRESETS, random_model

# The duration event JAX records for each XLA compile (jax.monitoring; the name is JAX's).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.parametrize("compile_threads", [1, 3])
def test_programs_compile_before_the_kv_cache_is_allocated(compile_threads):
    runner = ModelRunner(random_model("tiny-llama", jnp.float32), num_blocks=None, block_size=16,
                         max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, kv_dtype=jnp.float32)
    compiled = []  # (program name, cache allocated at the time, compiling thread)

    def listener(event: str, duration: float, **kw) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiled.append((kw.get("fun_name", ""), bool(runner.kv_caches), threading.current_thread().name))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        runner.warmup(num_blocks=20, compile_threads=compile_threads)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    steps = [(name, allocated) for name, allocated, _ in compiled if "forward" in name or "sample" in name]
    threads = {thread for name, _, thread in compiled if "forward" in name or "sample" in name}
    assert len(steps) >= len(runner.buckets.tokens)  # this hook does see the compiles
    assert not [name for name, allocated in steps if allocated], "a step program compiled after the KV cache"
    assert [c.shape[2] for c in runner.kv_caches] == [20] * runner.config.num_layers
    assert all(isinstance(c, jax.Array) for c in runner.kv_caches)
    # The step programs compile in the warm-up's pool of threads, not on the caller's.
    assert {name.split("_")[0] for name in threads} == {"compile"}
    # The start-up report: programs and seconds per phase (no multi-step programs at k = 1).
    phases = runner.warmup_breakdown
    assert list(phases) == ["compile_forward", "compile_sampler", "compile_multi_step", "allocate_kv_cache",
                            "first_runs_forward", "first_runs_sampler", "first_runs_multi_step"]
    assert [run.name for run in runner.first_run_seconds] == [f"forward T={t} S={s}" for t, s in sorted(
        {(t, min(s, t)) for t in runner.buckets.tokens for s in runner.buckets.seqs})]
    assert phases["compile_forward"].programs >= len(runner.buckets.tokens)
    assert phases["compile_multi_step"].programs == 0
    assert all(phase.seconds >= 0 for phase in phases.values())


def test_profiled_peak_covers_the_sampler_over_a_full_batch():
    # A large vocabulary and as many sequences as tokens: the top-k/top-p sampler's sort over
    # [S, V] needs more than the forward, so the KV budget must leave room for it.
    config = dataclasses.replace(PRESETS["tiny-llama"], vocab_size=16384)
    runner = ModelRunner(random_model(config, jnp.float32), num_blocks=None, block_size=16, max_model_len=128,
                         max_num_seqs=64, max_num_batched_tokens=64, kv_dtype=jnp.float32)
    sampler, forward = runner._sampler_peak_bytes(), runner._forward_peak_bytes()
    assert sampler > forward > 64 * 16384 * 4  # the case under test; the forward returns the [64, V] logits
    assert sampler > 2 * 64 * 16384 * 4  # reads the logits and sorts them
    assert runner.profile_peak_bytes() == sampler
