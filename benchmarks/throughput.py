"""Offline throughput of the engine vs Hugging Face transformers on the same workload.

    python benchmarks/throughput.py --preset llama-3.2-1b --workload fixed   # 1024 x (128 in, 128 out)
    python benchmarks/throughput.py --preset llama-3.1-8b --workload mixed   # 1000 x (U[32,1024] in, U[32,512] out)

Random weights, ignore_eos, seed 0. Prints requests/s, output tokens/s, total tokens/s and
the fraction of the run the device sat idle between steps (host time in the engine loop
over loop time). With --hf, runs the same workload shape through transformers' static-batch
`generate` and continuous-batching `generate_batch` (on --hf-requests of the requests, to fit
the time budget; tokens/s are comparable). Writes JSON to --out.
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


def run_engine(preset: str, prompts, out_lens, args) -> dict:
    import jax

    from jaxengine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(preset, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, async_scheduling=not args.sync_scheduling, progress=False)
    startup = time.perf_counter() - t0
    engine = llm.engine
    # Correctness before speed: the engine's first greedy token (paged kernel, ragged batch)
    # against argmax of the plain dense forward of the same weights, on 32 prompts. bf16 random
    # weights give near-tied logits, so a few flips are expected; a broken kernel gives ~0%.
    import jax.numpy as jnp

    check = llm.generate(prompts[:32], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    model = engine.runner.model()
    agree = 0
    for p, o in zip(prompts[:32], check):
        ref = int(jnp.argmax(model.dense_logits(jnp.asarray([p], jnp.int32))[0, -1]))
        agree += ref == o.outputs[0].token_ids[0]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in out_lens]
    engine.timing.update({k: 0 for k in engine.timing})
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(map(len, prompts))
    tm = engine.timing
    return {
        "engine": "jaxengine" + ("-sync" if args.sync_scheduling else ""), "preset": preset, "requests": len(prompts), "seconds": wall,
        "requests_per_s": len(prompts) / wall, "output_tokens_per_s": n_out / wall,
        "total_tokens_per_s": (n_in + n_out) / wall, "steps": tm["steps"],
        # Lower bound: the host's critical path between collecting a step and dispatching the
        # next. host_bound_fraction: steps whose result was ready before the host asked (there
        # the device idled for part of the overlapped output processing too).
        "device_idle_fraction": tm["critical_seconds"] / max(tm["loop_seconds"], 1e-9),
        "host_bound_fraction": tm["host_bound_steps"] / max(tm["steps"], 1),
        "startup_seconds": startup, "compile_seconds": engine.compile_seconds, "kv_blocks": engine.num_blocks,
        "first_token_agreement_with_dense": agree / len(check), "all_lengths_exact": all(
            len(o.outputs[0].token_ids) == k for o, k in zip(outs, out_lens)),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }


def run_hf(preset: str, prompts, out_lens, args) -> list[dict]:
    import torch
    import transformers

    from models import preset_config
    from models.loader import hf_config_dict

    cfg = preset_config(preset)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg))
    results = []
    n = min(args.hf_requests, len(prompts))
    prompts, out_lens = prompts[:n], out_lens[:n]
    n_in = sum(map(len, prompts))
    for impl in args.hf_impls:
        try:
            attn = "sdpa" if impl == "static" else "paged|sdpa"
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, dtype=torch.bfloat16).cuda().eval()
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
    ap.add_argument("--workload", choices=["fixed", "mixed"], default="fixed")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--sync-scheduling", action="store_true", help="collect each step before scheduling the next")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--hf-requests", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-impls", nargs="+", default=["static", "generate_batch"], choices=["static", "generate_batch"])
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--num-requests", type=int, default=None, help="first N requests only (smoke runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from models import preset_config

    prompts, out_lens = workload(args.workload, preset_config(args.preset).vocab_size)
    prompts, out_lens = prompts[: args.num_requests], out_lens[: args.num_requests]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows: list[dict] = []

    def record(new: list[dict]) -> None:  # written after each phase: a cut-off run keeps what it has
        for r in new:
            r.update(workload=args.workload, git_sha=sha)
        rows.extend(new)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))

    if args.hf:  # the peers first: their numbers are the ones a short lease must not lose
        record(run_hf(args.preset, prompts, out_lens, args))
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    if not args.no_engine:
        record([run_engine(args.preset, prompts, out_lens, args)])
    print(f"{'engine':28} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10} {'idle':>6} {'host-bound':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:28} error: {r['error'][:200]}")
            continue
        idle = f"{r['device_idle_fraction']:.1%}" if "device_idle_fraction" in r else "-"
        hb = f"{r['host_bound_fraction']:.1%}" if "host_bound_fraction" in r else "-"
        print(f"{r['engine']:28} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:10.0f} "
              f"{r['total_tokens_per_s']:10.0f} {idle:>6} {hb:>10}")
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
