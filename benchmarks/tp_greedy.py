"""Greedy tokens of a preset at one tensor-parallel size, to compare TP sizes on the GPU.

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/tp_greedy.py --preset llama-3.1-8b --tensor-parallel-size 1 --out tp1.json
    python3 benchmarks/tp_greedy.py --preset llama-3.1-8b --tensor-parallel-size 2 --out tp2.json
    python3 benchmarks/tp_greedy.py --compare tp1.json tp2.json

`--num-layers N` keeps the preset's widths and head layout at depth N: float32 70B fits one
H200 at 20 layers, so TP 1 can be the reference on a 4-GPU machine (TP sizes shard widths
and heads; depth only repeats the same sharded layer).

Why not the bf16 engine's tokens: random bf16 weights give near-tied logits, and TP sums
each row-parallel matmul in another order (partial sums, then an all-reduce), so bf16
greedy tokens of two TP sizes part at the first near-tie.
Here the same random weights run in float32 with the highest matmul precision (no TF32) and
the jnp reference attention (the Pallas kernel is checked against that reference on its
own): the sums still differ in order, but by ~1e-6 relative, far below the usual gap
between the top two logits. Each token's top-2 log-probability gap is recorded, so
`--compare` can tell a real difference from a near-tie.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe_prompts(vocab: int, n: int = 8, length: int = 256, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab - 10, int(k)).tolist() for k in rng.integers(length // 2, length + 1, n)]


def at_depth(preset: str, num_layers: int | None) -> str:
    """The name of the preset at `num_layers` layers, registered in models.PRESETS."""
    import dataclasses

    from models import PRESETS, preset_config

    if num_layers is None:
        return preset
    name = f"{preset}-{num_layers}-layers"
    cfg = preset_config(preset)
    windows = (cfg.sliding_windows * num_layers)[:num_layers]  # the preset's layer pattern, repeated
    PRESETS[name] = dataclasses.replace(cfg, num_layers=num_layers, sliding_windows=windows)
    return name


def greedy(preset: str, tp: int, dtype: str, n_tokens: int) -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxengine import LLM, SamplingParams
    from models import preset_config

    prompts = probe_prompts(preset_config(preset).vocab_size)
    llm = LLM(preset, dtype=dtype, tensor_parallel_size=tp, use_pallas=False, max_num_seqs=len(prompts),
              max_num_batched_tokens=512, max_model_len=512, num_kv_blocks=32 * len(prompts), progress=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    tokens, gaps = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        # top-1 minus top-2 log-probability at each position (the chosen token is top-1)
        gaps.append([float(np.subtract(*sorted((lp.logprob for lp in d.values()), reverse=True)[:2])) for d in c.logprobs])
    return dict(preset=preset, tensor_parallel_size=tp, dtype=dtype, matmul_precision="highest",
                attention="jnp reference", device=jax.devices()[0].device_kind, jax=jax.__version__,
                tokens=tokens, top2_gaps=gaps)


def compare(a: dict, b: dict) -> bool:
    """Print where two runs' greedy tokens part, with the top-2 gap there; True if equal."""
    same = a["tokens"] == b["tokens"]
    print(f"TP {a['tensor_parallel_size']} vs TP {b['tensor_parallel_size']} ({a['dtype']}): "
          f"{sum(x == y for x, y in zip(a['tokens'], b['tokens']))}/{len(a['tokens'])} prompts equal")
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        if x != y:
            k = next(j for j, (s, t) in enumerate(zip(x, y)) if s != t)
            print(f"  prompt {i}: first difference at token {k}; top-2 gap there "
                  f"{a['top2_gaps'][i][k]:.2e} / {b['top2_gaps'][i][k]:.2e} (smallest gap before it "
                  f"{min(a['top2_gaps'][i][:k], default=float('nan')):.2e})")
    smallest = min(min(g) for g in a["top2_gaps"])
    print(f"smallest top-2 gap over all tokens: {smallest:.2e}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--num-layers", type=int, default=None, help="the preset at this depth (default: its own)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs=2, metavar="JSON", help="compare two runs' outputs instead of running")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        sys.exit(0 if compare(a, b) else 1)
    result = greedy(at_depth(args.preset, args.num_layers), args.tensor_parallel_size, args.dtype, args.tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "top2_gaps")}))


if __name__ == "__main__":
    main()
