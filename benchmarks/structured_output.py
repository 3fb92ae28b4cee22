"""Structured outputs at batch speed: a batch where every row is JSON-schema constrained against
the same batch unconstrained, one engine, same prompts and seeds.

    python benchmarks/structured_output.py --model llama-3.2-1b --batch 256 --out so.json   # GPU (H200)
    python benchmarks/structured_output.py --batch 4 --max-tokens 32                      # CPU smoke run

Random-weight presets have no tokenizer: `--tokenizer DIR` gives one (a Llama 3 tokenizer for the
1B preset is the honest choice: the host's mask work grows with the tokenizer's vocabulary);
without it the shipped default model's tokenizer (8192 tokens) is used, which a preset's larger
vocabulary (128256 for the 1B) allows: the mask still spans every logit, the ids past the
tokenizer's are never allowed. Temperature 0.7, seed per row; the unconstrained run has
ignore_eos, so both runs decode up to --max-tokens unless the grammar ends first (a constrained
row ends when its JSON closes: tok/s counts the tokens each run produced).

Correctness before speed: every constrained output that finished ("stop") must validate against
the schema (jsonschema), else the script fails. Reports output tok/s of both runs and their ratio,
the host's mask-filling ms per step (StepTiming.grammar_mask_seconds), and the device's cost of a
mask: the sampler of a full batch timed with and without its bitmask (median of repeats, after
compilation). Writes JSON (device kind, jax version, git SHA) to --out.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Nested objects, arrays, enums, required fields; long arrays keep rows decoding.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "admin": {"type": "boolean"}},
                  "required": ["name", "admin"]},
        "values": {"type": "array", "items": {"type": "number"}},
    },
    "required": ["id", "kind", "owner", "values"],
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(llm, prompts: list[list[int]], params: list) -> dict:
    engine = llm.engine
    engine.reset_prefix_cache()
    engine.timing.reset()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    timing = engine.step_timing()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"outputs": outs, "seconds": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "steps": timing.steps, "host_mask_ms_per_step": 1e3 * timing.grammar_mask_seconds / max(timing.steps, 1),
            **{f"{k}_ms_per_step": 1e3 * getattr(timing, f"{k}_seconds") / max(timing.steps, 1)
               for k in ("loop", "wait", "critical")},
            "finish_reasons": {r: sum(o.outputs[0].finish_reason == r for o in outs) for r in ("stop", "length", "abort")}}


def device_mask_cost(engine, batch: int, repeats: int = 20) -> dict:
    """The sampler over a full batch's S bucket with and without an (all-allowed) bitmask: the
    device's per-step cost of applying the mask (ms, median)."""
    import jax
    import jax.numpy as jnp

    runner = engine.runner
    s = runner.buckets.seq_bucket(batch, runner.buckets.token_bucket(batch))
    buf, layout = runner._sampling_buf(s)
    vocab = engine.model_config.vocab_size
    logits = jax.device_put(jax.random.normal(jax.random.key(0), (s, vocab), jnp.float32), runner.device)
    words = -(-vocab // 32)
    mask = jax.device_put(np.full((s, words), -1, np.int32), runner.device)
    from jaxengine.worker.model_runner import PLAIN_VARIANTS

    variant = PLAIN_VARIANTS[2]  # temperature + top-k/top-p, as the runs' rows
    out = {}
    for name, m in (("unmasked", None), ("masked", mask)):
        jax.block_until_ready(runner._sample(logits, buf, m, layout=layout, variant=variant))  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(runner._sample(logits, buf, m, layout=layout, variant=variant))
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    # The host -> device copy of one step's packed mask (what a step uploads).
    host_mask = np.full((s, words), -1, np.int32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(host_mask, runner.device))
        times.append(time.perf_counter() - t0)
    return {"s_bucket": s, "sampler_ms": out["unmasked"], "sampler_masked_ms": out["masked"],
            "mask_apply_ms": out["masked"] - out["unmasked"], "mask_upload_ms": 1e3 * statistics.median(times),
            "mask_bytes": host_mask.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir or preset (default: the shipped default model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's, else the default model's)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--disable-any-whitespace", action="store_true", help="JSON without free whitespace")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jsonschema

    from jaxengine import LLM, SamplingParams, StructuredOutputsParams
    from jaxengine.config import default_model_dir

    tokenizer = args.tokenizer
    if tokenizer is None and args.model is not None and not Path(args.model).is_dir():
        tokenizer = str(default_model_dir())  # a preset: random weights, no tokenizer of its own
    t0 = time.perf_counter()
    llm = LLM(args.model, tokenizer=tokenizer, max_num_seqs=args.batch, max_model_len=args.max_model_len,
              progress=False)
    engine = llm.engine
    say(f"engine up in {time.perf_counter() - t0:.1f} s")
    tok_vocab = len(engine.tokenizer)
    if tok_vocab > engine.model_config.vocab_size:
        sys.exit(f"the tokenizer has {tok_vocab} tokens, more than the model's {engine.model_config.vocab_size} "
                 "logits: pass --tokenizer with one that fits")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, min(tok_vocab, engine.model_config.vocab_size) - 10, args.input_len).tolist()
               for _ in range(args.batch)]
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=args.disable_any_whitespace)
    free = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
            for i in range(args.batch)]
    constrained = [SamplingParams(temperature=0.7, seed=i, max_tokens=args.max_tokens, ignore_eos=True,
                                  structured_outputs=so) for i in range(args.batch)]
    # Warm-up with the whole batch: the masked sampler's programs compile on first use, one per
    # batch bucket the run passes through, and the grammar compiles once. The first constrained
    # batch's time (what a user's first one pays) is reported beside the timed runs.
    first = run(llm, prompts, constrained)
    first.pop("outputs")
    run(llm, prompts, free)

    base = run(llm, prompts, free)
    cons = run(llm, prompts, constrained)
    valid = 0
    for o in cons.pop("outputs"):
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)  # fails the run if not
            valid += 1
    base.pop("outputs")
    device = device_mask_cost(engine, args.batch)
    result = {
        "model": args.model or "default", "tokenizer": tokenizer or "model's", "tokenizer_vocab": tok_vocab,
        "model_vocab": engine.model_config.vocab_size, "batch": args.batch, "input_len": args.input_len,
        "max_tokens": args.max_tokens, "unconstrained": base, "constrained": cons, "valid_finished_outputs": valid,
        "throughput_ratio": cons["output_tok_s"] / base["output_tok_s"], "device_mask": device,
        "first_constrained_batch": first,
        "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "git_sha": git_sha(),
    }
    print(f"unconstrained {base['output_tok_s']:.0f} out tok/s, constrained {cons['output_tok_s']:.0f} out tok/s "
          f"(ratio {result['throughput_ratio']:.3f}; {valid} finished outputs valid, "
          f"finishes {cons['finish_reasons']}); host masks {cons['host_mask_ms_per_step']:.3f} ms/step; "
          f"device: sampler {device['sampler_ms']:.3f} ms, with mask {device['sampler_masked_ms']:.3f} ms, "
          f"upload {device['mask_upload_ms']:.3f} ms ({device['mask_bytes']} B) per step; first constrained batch "
          f"{first['seconds']:.2f} s (compiles), timed {cons['seconds']:.2f} s")
    for name, r in (("unconstrained", base), ("constrained", cons), ("first constrained", first)):
        print(f"{name}: ms/step loop {r['loop_ms_per_step']:.2f}, waiting for tokens {r['wait_ms_per_step']:.2f}, "
              f"device idle (collect to next dispatch) {r['critical_ms_per_step']:.2f}, masks {r['host_mask_ms_per_step']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
