"""Host time per engine step, by part, offline and in-process: where a host-bound step goes.

    python3 benchmarks/step_host_time.py [--preset llama-3.2-1b] [--no-timers] [--num-scheduler-steps K] [--out FILE]
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/step_host_time.py   # CUDA graphs off

1024 requests of 128 random prompt tokens / 128 greedy output tokens (ignore_eos,
FINAL_ONLY, prefix cache reset each repetition), max_num_seqs 256, max_num_batched_tokens
4096; repetition 1 warms up, 2 and 3 are reported. Each part is timed with
`time.perf_counter` around its call (dispatches return before the device runs them). The
forward's dispatch also records whether the previous step was still running when it
started (`prev_running`) and had finished when it returned (`prev_finished_meanwhile`).
`--no-timers` reports throughput only (an A/B of two code trees: run with PYTHONPATH set to
each, in one lease; between leases the same code has measured 15% apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxengine.config import EngineConfig  # noqa: E402
from jaxengine.engine.llm_engine import Engine  # noqa: E402
from jaxengine.outputs import OutputKind  # noqa: E402
from jaxengine.sampling_params import SamplingParams  # noqa: E402


def instrument(engine: Engine, spent: dict, forward_stats: dict) -> None:
    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return out
        return run

    runner = engine.runner
    forward = runner._forward

    def forward_timed(state, kv, buf, prev, layout):
        running = not prev.is_ready()
        t = time.perf_counter()
        out = forward(state, kv, buf, prev, layout=layout)
        spent["forward"] = spent.get("forward", 0.0) + time.perf_counter() - t
        forward_stats["calls"] += 1
        forward_stats["prev_running"] += running
        forward_stats["prev_finished_meanwhile"] += running and prev.is_ready()
        return out

    import jaxengine.worker.model_runner as model_runner

    runner._forward = forward_timed
    runner._sample = timed("sample", runner._sample)
    runner.execute_multi = timed("multi_step_dispatch", runner.execute_multi)
    runner.prepare = timed("prepare", runner.prepare)
    model_runner.pack = timed("pack", model_runner.pack)
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.update = timed("update", engine.scheduler.update)
    engine._outputs = timed("core_outputs", engine._outputs)
    engine.processor.process = timed("processor", engine.processor.process)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--no-timers", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-scheduler-steps", type=int, default=1, help="engine arg: decode steps per dispatch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = Engine(EngineConfig.from_kwargs(args.preset, max_num_seqs=256, max_num_batched_tokens=4096,
                                             max_model_len=args.max_model_len,
                                             num_scheduler_steps=args.num_scheduler_steps), progress=False)
    spent: dict[str, float] = {}
    forward_stats = {"calls": 0, "prev_running": 0, "prev_finished_meanwhile": 0}
    if not args.no_timers:
        instrument(engine, spent, forward_stats)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    results = []
    for rep in range(3):
        engine.reset_prefix_cache()
        for i in range(1024):
            engine.add_request(rng.integers(0, vocab, 128).tolist(), SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0),
                               request_id=f"r{rep}-{i}", output_kind=OutputKind.FINAL_ONLY)
        spent.clear()
        forward_stats.update(calls=0, prev_running=0, prev_finished_meanwhile=0)
        engine.timing.reset()
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step_records()
            steps += 1
        wall = time.perf_counter() - t0
        if rep == 0:
            continue
        result = dict(xla_flags=os.environ.get("XLA_FLAGS", ""), output_tok_s=1024 * 128 / wall,
                      ms_per_step=1e3 * wall / steps, steps=steps, forward_passes=engine.timing.steps,
                      multi_step_runs=engine.timing.multi_step_runs,
                      num_scheduler_steps=args.num_scheduler_steps,
                      waiting_for_tokens_ms=1e3 * engine.timing.wait_seconds / steps,
                      per_step_ms={k: round(1e3 * v / steps, 3) for k, v in sorted(spent.items())}, **forward_stats)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
