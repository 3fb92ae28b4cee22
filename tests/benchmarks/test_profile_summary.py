"""benchmarks/profile_summary.py on a real jax.profiler trace (CPU: the XLA compute threads
stand in for GPU streams): busy time, kinds and top kernels add up."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.profile_summary import kind_of, summarize, window


def test_summary_of_a_real_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    s = summarize(tmp_path)
    assert s["devices"] and all(0 < d["busy_s"] <= d["span_s"] for d in s["devices"].values())
    assert s["top"] and all(seconds > 0 and calls >= 1 for _, seconds, calls in s["top"])
    assert any(name.startswith("PjitFunction") and calls >= 3 for name, _, calls in s["host"])  # the jit dispatch
    assert not any(name.startswith("$") for name, _, _ in s["host"])  # no Python frames
    if len(s["top"]) < 40:  # every kernel listed: the kinds split the same total
        assert abs(sum(s["kinds"].values()) - sum(sec for _, sec, _ in s["top"])) < 1e-9
    assert abs(sum(sum(k.values()) for k in s["modules"].values()) - sum(s["kinds"].values())) < 1e-9
    # A window of kernels from the trace's middle: in time order, inside the window, named.
    rows = window(tmp_path, ms=1e3)
    assert rows and all(r["name"] and r["dur_us"] >= 0 for r in rows)
    starts = [r["start_us"] for r in rows]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] < 1e6


def test_kernel_kinds():
    assert kind_of("ragged_paged_attention_kernel") == "attention"
    assert kind_of("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "collective"
    assert kind_of("all_reduce_one_shot_kernel") == "collective"  # XLA's own, not NCCL's
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind_of("loop_add_fusion") == "other"
