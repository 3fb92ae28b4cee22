"""Offline throughput of the engine vs Hugging Face transformers on the same workload.

    python benchmarks/throughput.py --preset llama-3.2-1b --workload fixed   # 1024 x (128 in, 128 out)
    python benchmarks/throughput.py --preset llama-3.1-8b --workload mixed   # 1000 x (U[32,1024] in, U[32,512] out)
    python benchmarks/throughput.py --workload fixed mixed --scheduling async sync --tensor-parallel-size 2

Random weights, ignore_eos, seed 0. Prints requests/s, output tokens/s, total tokens/s and
the fraction of the run the device sat idle: 1 - (the run's steps replayed back to back,
with no host work in between) / (the run's wall time), and the same over the time spent
inside the engine's steps only (idle between steps, without adding the requests before the
first step and assembling outputs after the last). All (workload, scheduling) runs share
one engine start-up. With --hf --no-engine (a process of its own), runs the same workload
shape through transformers' static-batch `generate` and continuous-batching `generate_batch` (on
--hf-requests of the requests, to fit the time budget; tokens/s are comparable). Writes JSON
to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def workload(kind: str, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    if kind == "fixed":
        n, ins, outs = 1024, np.full(1024, 128), np.full(1024, 128)
    else:
        n = 1000
        ins, outs = rng.integers(32, 1025, n), rng.integers(32, 513, n)
    prompts = [rng.integers(10, vocab - 10, int(k)).tolist() for k in ins]
    return prompts, [int(k) for k in outs]


def greedy_probe(llm, prompts, n_tokens: int = 32) -> list[list[int]]:
    """Greedy tokens of a few prompts: equal across tensor-parallel sizes (compare the JSONs)."""
    from jaxengine import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def step_class(inputs) -> str:
    """"prefill" when any sequence of the step has more than one query token, else "decode"."""
    cu = inputs.meta.cu_q_lens[: inputs.num_seqs + 1]
    return "prefill" if int(cu[-1]) > inputs.num_seqs else "decode"


def replay_device_seconds(engine, recorded) -> dict[str, tuple[int, float]]:
    """The device time of a run's steps, per step class: each class's step inputs dispatched
    back to back with nothing for the host to do in between (their KV writes go to the same
    slots again). {class: (steps, seconds)}; 1 - the sum / the run's wall time is the fraction
    of the run the device sat idle, and the classes compare tensor-parallel sizes part by part."""
    import jax

    runner = engine.runner
    by_class: dict[str, tuple[int, float]] = {}
    for cls in ("prefill", "decode"):
        steps = [r for r in recorded if step_class(r[0]) == cls]
        out = None
        jax.block_until_ready(runner.kv_caches)
        t0 = time.perf_counter()
        for inputs, had_prev, num_steps in steps:
            if num_steps > 1:
                out = runner.execute_multi(inputs, num_steps, runner.no_prev_tokens if had_prev else None)
            else:
                out = runner.execute(inputs, runner.no_prev_tokens if had_prev else None)
        jax.block_until_ready((out, runner.kv_caches))
        by_class[cls] = (sum(r[2] for r in steps), time.perf_counter() - t0)
    return by_class


def say(msg: str) -> None:
    """Progress on stderr as each phase ends: a run cut off by its time limit still tells how far it got."""
    print(msg, file=sys.stderr, flush=True)


def run_engine(preset: str, runs: list[tuple[str, str]], vocab: int, args, record) -> None:
    """One engine (one start-up) for every (workload, scheduling) run, prefix cache reset in
    between; `record` gets each run's row as soon as it ends."""
    import jax

    from jaxengine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(preset, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
              num_scheduler_steps=args.num_scheduler_steps, sequence_parallel_min_tokens=args.sequence_parallel_min_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, prefill_attention_body=args.prefill_attention_body,
              compile_threads=args.compile_threads, progress=args.progress)
    startup = time.perf_counter() - t0
    engine = llm.engine
    breakdown = {k: {"programs": n, "seconds": round(sec, 2)} for k, (n, sec) in engine.runner.warmup_breakdown.items()}
    say(f"engine up in {startup:.1f} s, max_num_seqs {engine.config.max_num_seqs}, max_num_batched_tokens "
        f"{engine.config.max_num_batched_tokens}, {engine.num_blocks * engine.config.block_size} KV tokens; warm-up: "
        + ", ".join(f"{k} {v['programs']} in {v['seconds']:.1f} s" for k, v in breakdown.items()))
    probe_prompts, _ = workload("mixed", vocab)
    probe = greedy_probe(llm, [p[: args.max_model_len // 2] for p in probe_prompts[:8]])
    # Correctness before speed: the engine's first greedy token (paged kernel, ragged batch)
    # against argmax of the plain dense forward of the same weights, on 32 prompts. bf16 random
    # weights give near-tied logits, so a few flips are expected; a broken kernel gives ~0%.
    import jax.numpy as jnp

    prompts, _ = workload("fixed", vocab)
    check = llm.generate(prompts[:32], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    model = engine.runner.model()
    agree = 0
    for p, o in zip(prompts[:32], check):
        ref = int(jnp.argmax(model.dense_logits(jnp.asarray([p], jnp.int32))[0, -1]))
        agree += ref == o.outputs[0].token_ids[0]
    del model
    common = {
        "preset": preset, "tensor_parallel_size": args.tensor_parallel_size, "startup_seconds": startup,
        "compile_seconds": engine.compile_seconds, "warmup_breakdown": breakdown,
        "first_run_seconds": {k: round(v, 3) for k, v in engine.runner.first_run_seconds}, "kv_blocks": engine.num_blocks,
        "kv_tokens": engine.num_blocks * engine.config.block_size, "greedy_probe": probe,
        "first_token_agreement_with_dense": agree / len(check),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens, "num_scheduler_steps": args.num_scheduler_steps,
        "sequence_parallel_min_tokens": args.sequence_parallel_min_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization, "compile_threads": args.compile_threads,
        "prefill_attention_body": args.prefill_attention_body,
    }
    first = None
    execute, execute_multi = engine._execute, engine.runner.execute_multi
    for kind, scheduling in runs:
        prompts, out_lens = workload(kind, vocab)
        prompts, out_lens = prompts[: args.num_requests], out_lens[: args.num_requests]
        engine.config.async_scheduling = scheduling == "async"
        engine.reset_prefix_cache()  # no hits from an earlier run
        recorded = []

        def recording(inputs, prev=None):
            recorded.append((inputs, prev is not None, 1))
            return execute(inputs, prev) if prev is not None else execute(inputs)

        def recording_multi(inputs, num_steps, prev=None):
            recorded.append((inputs, prev is not None, num_steps))
            return execute_multi(inputs, num_steps, prev)

        engine._execute, engine.runner.execute_multi = recording, recording_multi
        params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in out_lens]
        engine.timing.reset()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        engine._execute, engine.runner.execute_multi = execute, execute_multi
        by_class = replay_device_seconds(engine, recorded)
        device_s = sum(sec for _, sec in by_class.values())
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(map(len, prompts))
        tm = engine.step_timing()
        row = {
            **common, "engine": f"jaxengine-{scheduling}", "workload": kind, "requests": len(prompts), "seconds": wall,
            "requests_per_s": len(prompts) / wall, "output_tokens_per_s": n_out / wall,
            "total_tokens_per_s": (n_in + n_out) / wall, "steps": tm.steps, "multi_step_runs": tm.multi_step_runs,
            "ms_per_step": 1e3 * wall / max(tm.steps, 1),
            # Host time outside engine.step(): adding the requests before the first step and
            # assembling outputs after the last (part of the idle fraction on short runs).
            "seconds_outside_steps": wall - tm.loop_seconds,
            "device_seconds_replayed": device_s,
            "device_ms_per_step_by_class": {k: {"steps": n, "ms_per_step": 1e3 * sec / max(n, 1)}
                                            for k, (n, sec) in by_class.items()},
            "device_idle_fraction": max(0.0, 1 - device_s / wall),
            # The same, over the time spent inside engine.step() only: idle between steps.
            "device_idle_fraction_between_steps": max(0.0, 1 - device_s / max(tm.loop_seconds, 1e-9)),
            # The host's critical path between collecting a step and dispatching the next, and
            # the steps whose result was ready before the host asked for it.
            "host_critical_fraction": tm.critical_seconds / max(tm.loop_seconds, 1e-9),
            "host_bound_fraction": tm.host_bound_steps / max(tm.steps, 1),
            "prefix_cache_hit_tokens": sum(o.num_cached_tokens for o in outs),
            "all_lengths_exact": all(len(o.outputs[0].token_ids) == k for o, k in zip(outs, out_lens)),
        }
        say(f"{kind} {scheduling}: {row['output_tokens_per_s']:.0f} output tok/s, {row['ms_per_step']:.2f} ms/step, "
            f"idle {row['device_idle_fraction']:.1%} ({row['device_idle_fraction_between_steps']:.1%} between steps); device "
            + ", ".join(f"{k} {n} steps x {1e3 * sec / max(n, 1):.2f} ms" for k, (n, sec) in by_class.items()))
        record([row])
        first = first or row
        recorded, outs = [], None  # free the step inputs and outputs before the next run
    if args.profile:  # a traced repeat of the first run's first requests: where the device time goes
        from benchmarks.profile_summary import print_summary, summarize

        kind, scheduling = runs[0]
        engine.config.async_scheduling = scheduling == "async"
        engine.reset_prefix_cache()
        prompts, out_lens = workload(kind, vocab)
        n = args.profile_requests
        params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in out_lens[:n]]
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            llm.generate(prompts[:n], params, use_tqdm=False)
        summary = summarize(args.profile)
        print(f"profile: {kind} {scheduling}, first {n} requests, trace in {args.profile}")
        print_summary(summary)
        first["profile"] = summary
        record([])  # rewrite the file with the profile in the first row


def run_hf(preset: str, prompts, out_lens, args) -> list[dict]:
    import torch
    import transformers

    from models import preset_config
    from models.loading.loader import hf_config_dict

    cfg = preset_config(preset)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg))
    results = []
    n = min(args.hf_requests, len(prompts))
    prompts, out_lens = prompts[:n], out_lens[:n]
    n_in = sum(map(len, prompts))
    for impl in args.hf_impls:
        try:
            attn = "sdpa" if impl == "static" else "paged|sdpa"
            with torch.device("cuda"):  # random init on the GPU: an 8B init on the host ran past 5 minutes
                model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=torch.bfloat16).eval()
            gen_cfg = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n_out = 0
            with torch.no_grad():
                if impl == "static":
                    # Static batches of equal-length prompts (the fixed workload); max out_len per batch.
                    bs = args.hf_batch
                    for i in range(0, n, bs):
                        chunk = prompts[i : i + bs]
                        width = max(map(len, chunk))
                        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
                        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
                        new = max(out_lens[i : i + bs])
                        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                             generation_config=gen_cfg)
                        n_out += sum(out_lens[i : i + bs])  # tokens past each request's own length are waste
                else:
                    gen_cfg.max_new_tokens = max(out_lens)
                    outs = model.generate_batch(prompts, generation_config=gen_cfg, progress_bar=False)
                    n_out = sum(len(o.generated_tokens) for o in outs.values())
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            results.append({"engine": f"transformers-{impl}", "preset": preset, "requests": n, "seconds": wall,
                            "requests_per_s": n / wall, "output_tokens_per_s": n_out / wall,
                            "total_tokens_per_s": (n_in + n_out) / wall, "transformers": transformers.__version__})
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # report, don't lose the engine's numbers
            results.append({"engine": f"transformers-{impl}", "error": repr(e)[:500]})
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--workload", nargs="+", choices=["fixed", "mixed"], default=["fixed"])
    ap.add_argument("--scheduling", nargs="+", choices=["async", "sync"], default=["async"],
                    help="async: schedule step N+1 while N runs (the default); sync: collect N first")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="decode steps per dispatch when every running request decodes (engine arg)")
    ap.add_argument("--sequence-parallel-min-tokens", type=int, default=None,
                    help="tensor parallel: steps of at least this many tokens split the residual stream by token (engine arg)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--prefill-attention-body", choices=["auto", "mosaic", "triton"], default="auto",
                    help="engine arg: the attention kernel's body for prefill chunks (A/B: triton vs auto)")
    ap.add_argument("--compile-threads", type=int, default=None, help="default: the engine's (min(4, CPUs))")
    ap.add_argument("--progress", action="store_true", help="the engine's start-up progress bars (stderr)")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--hf-requests", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-impls", nargs="+", default=["static", "generate_batch"], choices=["static", "generate_batch"])
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--num-requests", type=int, default=None, help="first N requests only (smoke runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the runs, trace the first run's first --profile-requests requests into DIR and summarise it")
    ap.add_argument("--profile-requests", type=int, default=256)
    args = ap.parse_args()
    if args.hf and not args.no_engine:
        # torch keeps its CUDA context and cached blocks, and the engine sizes its KV cache from
        # what is free: on an H200 the engine half of such a combined run never finished.
        ap.error("run the transformers peers in their own process: add --no-engine to the --hf command")

    from models import preset_config

    vocab = preset_config(args.preset).vocab_size
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows: list[dict] = []

    def record(new: list[dict], kind: str | None = None) -> None:  # after each phase: a cut-off run keeps what it has
        for r in new:
            r.setdefault("workload", kind)
            r["git_sha"] = sha
        rows.extend(new)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))

    if args.hf:
        for kind in args.workload:
            prompts, out_lens = workload(kind, vocab)
            record(run_hf(args.preset, prompts[: args.num_requests], out_lens[: args.num_requests], args), kind)
    if not args.no_engine:
        runs = [(k, s) for k in args.workload for s in args.scheduling]
        run_engine(args.preset, runs, vocab, args, record)
    print(f"{'engine':24} {'workload':8} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'ms/step':>8} {'idle':>6} "
          f"{'between steps':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:24} error: {r['error'][:200]}")
            continue
        idle = f"{r['device_idle_fraction']:.1%}" if "device_idle_fraction" in r else "-"
        between = f"{r['device_idle_fraction_between_steps']:.1%}" if "device_idle_fraction_between_steps" in r else "-"
        step = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
        print(f"{r['engine']:24} {r['workload']:8} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:10.0f} "
              f"{r['total_tokens_per_s']:10.0f} {step:>8} {idle:>6} {between:>13}")
    print(json.dumps([{k: v for k, v in r.items() if k != "greedy_probe"} for r in rows]))


if __name__ == "__main__":
    main()
