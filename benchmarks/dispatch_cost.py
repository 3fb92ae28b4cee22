"""The host's cost of dispatching one engine step, against the device's time for it.

    python3 benchmarks/dispatch_cost.py [--preset llama-3.2-1b] [--num-scheduler-steps K] [--out FILE]

An engine runs 256 requests (128 random prompt tokens, greedy) and one decode step of all
256 is captured. Each call below then runs 50 times with the device idle before each one
(how long the dispatch itself takes, and dispatch + run) and 50 times back to back (the
host's dispatch rate against the device's run time):
- the forward alone, its packed inputs as numpy (as the engine passes them) and already
  on the device;
- the forward + the sampler (`ModelRunner.execute`, a whole single step);
- with --num-scheduler-steps K > 1, the K-step decode program (`execute_multi`), per step;
- a trivial jit over the same parameter and cache leaves (JAX's own per-call cost).
Then 30 + 30 forwards under `jax.profiler`, summarised by `profile_summary` (the host
spans show XLA's share: `cuGraphLaunch`, `command_buffer::update`, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks.profile_summary import print_summary, summarize  # noqa: E402
from jaxengine.config import EngineConfig  # noqa: E402
from jaxengine.engine.llm_engine import Engine  # noqa: E402
from jaxengine.outputs import OutputKind  # noqa: E402
from jaxengine.worker.packing import pack  # noqa: E402
from jaxengine.worker.step_inputs import step_arrays  # noqa: E402
from jaxengine.sampling_params import SamplingParams  # noqa: E402


def capture_decode_step(engine: Engine, num_requests: int):
    """Run the requests; return the StepInputs of a step in which all of them decode."""
    captured = []
    prepare = engine.runner.prepare

    def spy(*args):
        inputs = prepare(*args)
        if inputs.num_seqs == num_requests and len(inputs.tokens) <= 2 * num_requests and not captured:
            captured.append(inputs)
        return inputs

    engine.runner.prepare = spy
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    for i in range(num_requests):
        engine.add_request(rng.integers(0, vocab, 128).tolist(), SamplingParams(max_tokens=64, ignore_eos=True, temperature=0),
                           request_id=f"r{i}", output_kind=OutputKind.FINAL_ONLY)
    while engine.has_unfinished_requests():
        engine.step_records()
    engine.runner.prepare = prepare
    if not captured:
        raise RuntimeError("no step had every request decoding")
    return captured[0]


def time_calls(call, n: int = 50) -> dict[str, float]:
    """ms per call: dispatch and dispatch + run with the device idle before each call
    (medians), then dispatch and wall time per call back to back."""
    jax.block_until_ready(call())
    jax.block_until_ready(call())
    dispatch, total = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        out = call()
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        dispatch.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n):
        out = call()  # the previous output is dropped: memory stays flat
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return dict(dispatch_idle_ms=1e3 * float(np.median(dispatch)), run_idle_ms=1e3 * float(np.median(total)),
                dispatch_back_to_back_ms=1e3 * (t1 - t0) / n, per_call_back_to_back_ms=1e3 * (t2 - t0) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--num-scheduler-steps", type=int, default=1)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.num_scheduler_steps
    engine = Engine(EngineConfig.from_kwargs(
        args.preset, max_num_seqs=args.num_requests,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.num_requests),
        max_model_len=args.max_model_len, gpu_memory_utilization=0.5, num_scheduler_steps=k), progress=False)
    runner = engine.runner
    inputs = capture_decode_step(engine, args.num_requests)
    buf, layout = pack(step_arrays(inputs))
    on_device = jax.device_put(buf)

    def forward(packed):
        def call():
            logits, runner.kv_caches = runner._forward(runner.state, runner.kv_caches, packed, runner.no_prev_tokens,
                                                       layout=layout)
            return logits
        return call

    leaves = runner.state + runner.kv_caches
    trivial = jax.jit(lambda xs: xs[0].reshape(-1)[:1] + 0)
    calls = {
        "forward (packed inputs as numpy, as the engine)": forward(buf),
        "forward (packed inputs already on the device)": forward(on_device),
        "forward + sampler (one whole step)": lambda: runner.execute(inputs)[0].token_ids,
        f"trivial jit over the same {len(leaves)} leaves": lambda: trivial(leaves),
    }
    if k > 1:
        calls[f"{k}-step decode program (per call; {k} steps each)"] = lambda: runner.execute_multi(inputs, k)
    result: dict = dict(preset=args.preset, device=jax.devices()[0].device_kind, jax=jax.__version__,
                        num_seqs=inputs.num_seqs, num_scheduler_steps=k, calls={})
    print(f"{result['device']}, jax {jax.__version__}, {args.preset}, a decode step of {inputs.num_seqs} requests")
    for name, call in calls.items():
        ms = result["calls"][name] = time_calls(call, args.calls)
        print(f"{name:52s} " + "  ".join(f"{key} {v:7.3f}" for key, v in ms.items()), flush=True)

    trace_dir = tempfile.mkdtemp(prefix="dispatch_trace_")
    call = calls["forward (packed inputs as numpy, as the engine)"]
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(30):
            jax.block_until_ready(call())
        for _ in range(30):
            out = call()
        jax.block_until_ready(out)
    summary = summarize(trace_dir)
    print(f"30 forwards with the device idle before each, then 30 back to back (trace in {trace_dir}):")
    print_summary(summary)
    result["trace"] = summary
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
