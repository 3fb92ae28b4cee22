"""Batch-1 latency: one request at a time, its time per output token (TPOT) and time to
first token, against the weight-read roofline measured in the same run.

    python benchmarks/latency.py --preset llama-3.1-8b --num-scheduler-steps 4 --out $OUT/latency.json

Random weights, random prompts of --prompt-len tokens, greedy, ignore_eos, --output-len
tokens; --repeats requests one after another (each with its own prompt, so no prefix-cache
hits), median reported. TPOT = (finish - first token) / (output tokens - 1), from the
engine's own RequestMetrics timestamps. Roofline: at batch 1 a decode step must read every
weight once, so TPOT >= parameter bytes / the device-to-device copy bandwidth measured here.
Uses only the public API (`jaxengine.LLM`), so the same script times any commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path.cwd()))  # the tree being timed: run from its root


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes`."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + 1)
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-scheduler-steps", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--compile-threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax

    from jaxengine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.preset, max_model_len=args.max_model_len, num_scheduler_steps=args.num_scheduler_steps,
              gpu_memory_utilization=args.gpu_memory_utilization, compile_threads=args.compile_threads, progress=False)
    startup = time.perf_counter() - t0
    weights = llm.engine.runner.model()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(weights))
    del weights
    vocab = llm.engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate([rng.integers(10, vocab - 10, args.prompt_len).tolist()], params, use_tqdm=False)  # warm
    tpot, ttft = [], []
    for _ in range(args.repeats):
        prompt = rng.integers(10, vocab - 10, args.prompt_len).tolist()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        m, n = out.metrics, len(out.outputs[0].token_ids)
        assert n == args.output_len, f"got {n} tokens, asked for {args.output_len}"
        tpot.append((m.finished_time - m.first_token_time) / (n - 1))
        ttft.append(m.first_token_time - m.arrival_time)
    bandwidth = copy_bandwidth()
    floor = param_bytes / bandwidth
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {
        "preset": args.preset, "prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
        "num_scheduler_steps": args.num_scheduler_steps, "tpot_ms_median": 1e3 * statistics.median(tpot),
        "tpot_ms_all": [round(1e3 * t, 3) for t in tpot], "ttft_ms_median": 1e3 * statistics.median(ttft),
        "param_bytes": param_bytes, "copy_bandwidth_gbs": bandwidth / 1e9, "roofline_tpot_ms": 1e3 * floor,
        "roofline_fraction": floor / statistics.median(tpot), "startup_seconds": startup,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "git": sha or None,
    }
    print(f"{args.preset} batch 1: TPOT {row['tpot_ms_median']:.2f} ms (roofline {row['roofline_tpot_ms']:.2f} ms at "
          f"{row['copy_bandwidth_gbs']:.0f} GB/s: {row['roofline_fraction']:.0%}), TTFT {row['ttft_ms_median']:.1f} ms, "
          f"start-up {startup:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
