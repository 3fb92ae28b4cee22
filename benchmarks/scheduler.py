"""CPU simulation of the host loop: 10,000 requests through the scheduler with a fake model.

Measures schedule() + update() time per step (the fake model is not timed) and reports
the median and p99 over the steady-state steps, i.e. those where the batch is full
(>= 95% of max_num_seqs scheduled). Target: < 1 ms per step at 256 running requests.
Both wall time and this thread's CPU time are reported: on a shared, oversubscribed
machine the wall-time tail is mostly the OS running someone else; the CPU-time tail is
what the scheduler itself costs. Python's GC stays on (its pauses are part of the cost).

    python benchmarks/scheduler.py                       # 256 and 1024 running
    python benchmarks/scheduler.py --max-num-seqs 256 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxengine.core.request import Request  # noqa: E402
from jaxengine.sampling_params import SamplingParams  # noqa: E402
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig  # noqa: E402

VOCAB = 32000


def request_stream(n: int, seed: int, args):
    """Requests generated on demand (as a server receives them), not all held up front."""
    rng = random.Random(seed)
    # A share of prompts start with one of a few "system prompts": real prefix-cache hits.
    system_prompts = [[rng.randrange(VOCAB) for _ in range(args.system_prompt_len)] for _ in range(8)]
    for i in range(n):
        plen = rng.randint(args.min_prompt, args.max_prompt)
        prompt = [rng.randrange(VOCAB) for _ in range(plen)]
        if rng.random() < args.shared_prefix_fraction:
            prompt = rng.choice(system_prompts) + prompt
        params = SamplingParams(max_tokens=rng.randint(args.min_output, args.max_output),
                                ignore_eos=True)
        yield Request(f"req-{i}", prompt, params, arrival_time=float(i), eos_token_id=2)


def fake_model(out) -> dict[str, list[int]]:
    """A token for every request whose step ends at its last known token."""
    return {s.request.request_id: [(s.start_position * 7 + 1) % VOCAB]
            for s in out.scheduled if s.sample}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(max_num_seqs: int, args) -> dict:
    max_len = args.system_prompt_len + args.max_prompt + args.max_output
    blocks_per_seq = -(-max_len // args.block_size)
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_len,
        block_size=args.block_size,
        # Enough for the full running set at mean length; long tails force some preemption.
        num_blocks=int(max_num_seqs * blocks_per_seq * args.pool_fraction) + 1,
        enable_prefix_caching=True,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
    )
    sched = Scheduler(cfg)
    # What the engine should do after start-up (as vLLM does): move the long-lived pool
    # objects out of the GC's sight so collections do not keep re-scanning them.
    gc.collect()
    gc.freeze()
    stream = request_stream(args.num_requests, args.seed, args)
    pending = True

    step_times, cpu_times, running_at, tokens_at = [], [], [], []
    clock, cpu = time.perf_counter, time.thread_time
    t_start = clock()
    while pending or sched.has_unfinished_requests():
        # Arrivals (untimed): keep a backlog of waiting requests, as a loaded server has.
        while pending and sched.num_waiting < args.backlog:
            r = next(stream, None)
            if r is None:
                pending = False
            else:
                sched.add_request(r)
        t0, c0 = clock(), cpu()
        out = sched.schedule()
        t1, c1 = clock(), cpu()
        sampled = fake_model(out)
        t2, c2 = clock(), cpu()
        sched.update(out, sampled)
        t3, c3 = clock(), cpu()
        step_times.append((t1 - t0) + (t3 - t2))
        cpu_times.append((c1 - c0) + (c3 - c2))
        running_at.append(len(out.scheduled))
        tokens_at.append(out.total_num_scheduled_tokens)
    total = clock() - t_start

    full = [n >= 0.95 * max_num_seqs for n in running_at]
    steady = [t for t, f in zip(step_times, full) if f]
    steady_cpu = [t for t, f in zip(cpu_times, full) if f]
    stats = sched.make_stats()
    res = {
        "max_num_seqs": max_num_seqs,
        "num_blocks": cfg.num_blocks,
        "steps": len(step_times),
        "steady_steps": len(steady),
        "median_ms": statistics.median(steady) * 1e3 if steady else float("nan"),
        "p99_ms": percentile(steady, 0.99) * 1e3 if steady else float("nan"),
        "cpu_median_ms": statistics.median(steady_cpu) * 1e3 if steady else float("nan"),
        "cpu_p99_ms": percentile(steady_cpu, 0.99) * 1e3 if steady else float("nan"),
        "mean_scheduled_seqs": statistics.mean(running_at),
        "mean_scheduled_tokens": statistics.mean(tokens_at),
        "preemptions": stats.num_preemptions,
        "prefix_hit_rate": stats.prefix_cache_hits / max(1, stats.prefix_cache_queries),
        "total_s": total,
    }
    gc.unfreeze()
    return res


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--max-num-seqs", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--long-prefill-token-threshold", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--min-output", type=int, default=32)
    p.add_argument("--max-output", type=int, default=512)
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--shared-prefix-fraction", type=float, default=0.3)
    p.add_argument("--pool-fraction", type=float, default=0.6,
                   help="KV pool size as a fraction of max_num_seqs * max_model_len")
    p.add_argument("--backlog", type=int, default=64, help="waiting requests kept queued")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()

    env = {"python": platform.python_version(), "cpu": cpu_model(), "cpus": os.cpu_count(),
           "git_sha": git_sha(), "loadavg_start": os.getloadavg()[0]}
    print(f"# scheduler simulation: {args.num_requests} requests, python {env['python']}, "
          f"{env['cpus']} x {env['cpu']}, load average {env['loadavg_start']:.1f}")
    print("| running | steps | steady steps | median ms/step | p99 ms/step | CPU median ms "
          "| CPU p99 ms | tokens/step | preemptions | prefix hit rate | total s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for m in args.max_num_seqs:
        r = run(m, args)
        results.append(r)
        print(f"| {m} | {r['steps']} | {r['steady_steps']} | {r['median_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {r['cpu_median_ms']:.3f} | {r['cpu_p99_ms']:.3f} | "
              f"{r['mean_scheduled_tokens']:.0f} | {r['preemptions']} | "
              f"{r['prefix_hit_rate']:.2f} | {r['total_s']:.1f} |", flush=True)
    env["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
