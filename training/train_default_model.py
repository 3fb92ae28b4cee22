#!/usr/bin/env python
"""Train jaxengine's default model: a small Llama on the Python standard library.

The recipe, end to end (everything is deterministic given --seed and the stdlib found):
  1. corpus: every `.py` file of this interpreter's stdlib (`sysconfig.get_paths()["stdlib"]`,
     test directories included where installed; site-/dist-packages, non-UTF-8 files and
     files that do not compile are skipped), split by file: sha256(relative path) mod 100
     < --heldout-percent is held out for validation;
  2. a byte-level BPE tokenizer (`tokenizers`) trained on the train split, with
     `<|endoftext|>` (id 0) as BOS, EOS and padding; each file is encoded as
     `<|endoftext|>` + its text, and the files are concatenated into one stream per split;
  3. a Llama (`models.CausalLM`, the engine's own Flax model) trained with optax AdamW,
     linear warm-up then cosine decay, on random windows of the train stream, bf16 compute
     with float32 master weights; the held-out loss is checked every --eval-every steps and
     the best parameters are kept;
  4. validation loss: mean token cross-entropy (nats) over the held-out stream cut into
     consecutive non-overlapping windows of --seq-len + 1 tokens (inputs [:-1], targets
     [1:]), computed in float32 on the bfloat16 weights that are shipped;
  5. a Hugging Face checkpoint directory: config.json, generation_config.json,
     model.safetensors (bf16), tokenizer.json, tokenizer_config.json,
     special_tokens_map.json, heldout_eval.npy (the evenly spaced subset of held-out windows
     that tests re-score), heldout_files.txt, training_metrics.json and a README.md card.

Default model run (as shipped; one H100, ~3 minutes in all; /tmp/py311/python3.11 held the
`.py` files of CPython 3.11.7's lib/python3.11, site-packages left out, copied with tar):
    python training/train_default_model.py --out jaxengine/default_model \
        --stdlib /tmp/py311/python3.11 --stdlib-version 3.11.7 --epochs 10 --time-limit 150
Without --stdlib the corpus is the stdlib of the interpreter that runs the recipe.
CPU smoke run (seconds):
    python training/train_default_model.py --out /tmp/smoke --max-files 40 --heldout-percent 25 \
        --steps 3 --vocab-size 512 --hidden-size 64 --intermediate-size 128 --num-layers 1 \
        --num-heads 2 --num-kv-heads 1 --seq-len 64 --batch-size 4 --eval-windows 4
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]  # the repo's `models` package; this folder

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
import stdlib_corpus as corpus  # noqa: E402
from model_card import SAMPLE_PROMPTS, write_model_card  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=16.0, help="passes over the train tokens when --steps is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the matrices (not the norms)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=640)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--heldout-percent", type=int, default=5)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows shipped for tests to re-score")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-tokens", type=int, default=96, help="greedy tokens per card sample (0: none)")
    p.add_argument("--max-files", type=int, default=None, help="evenly spaced subset of the stdlib (smoke tests)")
    p.add_argument("--stdlib", default=None, help="stdlib root (default: this interpreter's)")
    p.add_argument("--card-note", default="", help="a sentence on the corpus for the model card")
    p.add_argument("--stdlib-version", default=None,
                   help="CPython version of the --stdlib given, for the model card (default: this interpreter's)")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds (0: none)")
    args = p.parse_args(argv)
    if args.seq_len > args.max_position_embeddings:
        p.error("--seq-len must not exceed --max-position-embeddings")
    if args.hidden_size % args.num_heads:
        p.error("--hidden-size must be a multiple of --num-heads")
    return args


def hf_config(args: argparse.Namespace, vocab_size: int, special_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads, "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.hidden_size // args.num_heads, "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": special_id, "eos_token_id": special_id, "pad_token_id": special_id,
        "torch_dtype": "bfloat16",
    }


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def make_window_losses(graphdef):
    """jit: (params, windows [b, S+1]) -> summed cross-entropy of each window [b] (nats)."""

    @jax.jit
    def window_losses(params, windows):
        logits = nnx.merge(graphdef, params).dense_logits(windows[:, :-1])
        return cross_entropy(logits, windows[:, 1:]).sum(axis=-1)

    return window_losses


def mean_loss(window_losses, params, windows: np.ndarray, batch: int) -> float:
    """Mean token cross-entropy over all targets of `windows`, in fixed-size batches."""
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        n = len(chunk)
        if n < batch:  # pad with copies of the first window so one program serves all batches
            chunk = np.concatenate([chunk, np.repeat(windows[:1], batch - n, axis=0)])
        total += float(np.asarray(window_losses(params, jnp.asarray(chunk)), np.float64)[:n].sum())
    return total / (len(windows) * (windows.shape[1] - 1))


def greedy_samples(graphdef, params, tok, prompts: list[str], new_tokens: int, eos: int, buf_len: int) -> list[str]:
    """Greedy continuations, recomputing the whole (fixed-size) buffer each step: slow but
    one compiled program, and independent of the engine being trained for."""
    ids = [tok.encode(p).ids for p in prompts]
    buf = np.full((len(prompts), buf_len), eos, np.int32)
    for b, seq in enumerate(ids):
        buf[b, :len(seq)] = seq
    lens = np.array([len(s) for s in ids])
    done = np.zeros(len(prompts), bool)

    @jax.jit
    def next_tokens(params, buf, last):
        logits = nnx.merge(graphdef, params).dense_logits(buf)
        return jnp.argmax(logits[jnp.arange(buf.shape[0]), last], axis=-1)

    for _ in range(new_tokens):
        if done.all() or lens.max() >= buf_len:
            break
        nxt = np.asarray(next_tokens(params, jnp.asarray(buf), jnp.asarray(lens - 1)))
        for b in np.flatnonzero(~done):
            buf[b, lens[b]] = nxt[b]
            lens[b] += 1
            done[b] = nxt[b] == eos
    out = []
    for b, seq in enumerate(ids):
        new = [t for t in buf[b, len(seq):lens[b]].tolist() if t != eos]
        out.append(prompts[b] + tok.decode(new))
    return out


# The model has never seen a conversation: system / user / tool messages become comment
# lines and assistant messages plain code, after the BOS it was trained on, so a chat
# request reads as a comment the code continues (the model card's "Chat template").
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ '\\n' }}{% else %}{% for line in message['content'].split('\\n') %}{{ ('# ' + line) if line else '#' }}{{ '\\n' }}{% endfor %}{% endif %}{% endfor %}"


def write_tokenizer_files(tok, out: Path, special: str, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": special, "eos_token": special, "pad_token": special}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "unk_token": None,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "add_prefix_space": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        print(f"[{now - t_start:7.1f}s] {name}: {now - since:.1f}s", flush=True)
        return now

    # 1-2. corpus, split, tokenizer, token streams -----------------------------------------
    t = time.perf_counter()
    root = Path(args.stdlib) if args.stdlib else corpus.stdlib_root()
    files, skipped = corpus.collect_files(root, args.max_files)
    train_files, heldout_files = corpus.split_files(files, args.heldout_percent)
    t = lap("corpus", t)
    tok = corpus.train_tokenizer([f.text for f in train_files], args.vocab_size)
    special_id = tok.token_to_id(corpus.SPECIAL_TOKEN)
    t = lap("tokenizer", t)
    train_stream = corpus.token_stream(tok, [f.text for f in train_files])
    heldout_stream = corpus.token_stream(tok, [f.text for f in heldout_files])
    windows = corpus.fixed_windows(heldout_stream, args.seq_len)
    shipped_idx = corpus.evenly_spaced(len(windows), args.eval_windows)
    t = lap("encode", t)
    data = {
        "stdlib_root": str(root), "python": args.stdlib_version or platform.python_version(),
        "recipe_python": platform.python_version(),
        "files": len(files), "train_files": len(train_files), "heldout_files": len(heldout_files),
        "skipped": skipped, "train_bytes": sum(len(f.text.encode()) for f in train_files),
        "heldout_bytes": sum(len(f.text.encode()) for f in heldout_files),
        "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(heldout_stream)),
        "heldout_windows": int(len(windows)), "shipped_windows": int(len(shipped_idx)),
        "vocab_size": tok.get_vocab_size(),
        "has_test_dirs": any(f.rel.startswith("test/") for f in files),
    }
    print(json.dumps(data), flush=True)

    # 3. model, optimizer, training -------------------------------------------------------
    hf = hf_config(args, tok.get_vocab_size(), special_id)
    cfg = models.ModelConfig.from_hf_dict(hf)
    train_model = models.CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    train_graphdef, state = nnx.split(train_model)
    params = nnx.to_pure_dict(state)
    eval_graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: models.CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))

    tokens_per_step = args.batch_size * args.seq_len
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_stream) / tokens_per_step))
    # AdamW as optax.adamw composes it, with the learning rate applied in the step from a host
    # value, so the schedule can be re-planned (see --time-limit) without recompiling.
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(args.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(args.weight_decay, mask=decay_mask),
    )
    opt_state = tx.init(params)
    train_tokens = jnp.asarray(train_stream)
    base_key = jax.random.key(args.seed)
    if len(train_stream) <= args.seq_len + 1:
        raise ValueError(f"{len(train_stream)} train tokens do not fill one window of {args.seq_len + 1}")

    def loss_fn(params, batch):
        logits = nnx.merge(train_graphdef, params).dense_logits(batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, step, lr):
        key = jax.random.fold_in(base_key, step)
        starts = jax.random.randint(key, (args.batch_size,), 0, tokens.shape[0] - args.seq_len)
        batch = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (args.seq_len + 1,)))(starts)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss, optax.global_norm(grads)

    train_window_losses = make_window_losses(train_graphdef)
    eval_batch = min(16, len(windows))
    monitor = windows[corpus.evenly_spaced(len(windows), 128)]  # held-out subset watched during training

    warmup = min(args.warmup_steps, max(1, steps // 10))

    def lr_at(step: int, total: int) -> float:
        """Linear warm-up to --lr, then cosine decay to --lr * --min-lr-ratio at `total`."""
        if step <= warmup:
            return args.lr * step / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        low = args.lr * args.min_lr_ratio
        return low + 0.5 * (args.lr - low) * (1.0 + math.cos(math.pi * frac))

    print(f"model: {n_params:,} params; {steps} steps of {tokens_per_step} tokens "
          f"({steps * tokens_per_step / len(train_stream):.1f} epochs); device {jax.devices()[0].device_kind}",
          flush=True)
    t = lap("setup", t)
    history, evals, planned_steps, replanned = [], [], steps, False
    best: tuple[float, int, dict | None] = (math.inf, -1, None)
    eval_seconds = 0.0

    def monitor_eval(step: int) -> None:
        nonlocal best, eval_seconds
        t0 = time.perf_counter()
        v = mean_loss(train_window_losses, params, monitor, eval_batch)
        eval_seconds += time.perf_counter() - t0
        evals.append({"step": step, "heldout_loss_monitor": round(v, 4)})
        print(f"  eval step {step}: held-out loss (monitor windows) {v:.4f}", flush=True)
        if v < best[0]:
            best = (v, step, jax.tree.map(jnp.copy, params))

    t_train = time.perf_counter()
    t_first = t_train
    step, stopped_early = 0, False
    while step < steps:
        step += 1
        lr = lr_at(step, steps)
        params, opt_state, loss, gnorm = train_step(params, opt_state, train_tokens, jnp.int32(step), jnp.float32(lr))
        if step == 1:
            loss.block_until_ready()
            t_first = time.perf_counter()
            timings["compile_and_first_step"] = round(t_first - t_train, 2)
        if step == 31 and args.time_limit and steps > step:
            # Re-plan once the step time is known: finish the cosine inside --time-limit.
            loss.block_until_ready()
            now = time.perf_counter()
            per_step = (now - t_first - eval_seconds) / 30
            n_evals = steps // args.eval_every + 1
            budget = 0.9 * (args.time_limit - (now - t_train)) - n_evals * 30 * per_step
            fits = step + int(budget / per_step)
            print(f"step time {per_step * 1e3:.1f} ms: {steps} steps take ~{steps * per_step:.0f}s", flush=True)
            if fits < steps:
                steps, replanned = max(fits, step + 1), True
                print(f"re-planned to {steps} steps to end within --time-limit {args.time_limit:g}s", flush=True)
        if step % args.log_every == 0 or step == steps:
            loss, gnorm = float(loss), float(gnorm)  # waits for the step
            el = time.perf_counter() - t_first - eval_seconds
            tps = (step - 1) * tokens_per_step / el if el > 0 else 0.0
            history.append({"step": step, "loss": round(loss, 4), "grad_norm": round(gnorm, 3),
                            "lr": lr, "tokens_per_second": round(tps)})
            print(f"step {step}/{steps} loss {loss:.4f} gnorm {gnorm:.2f} lr {lr:.2e} "
                  f"{tps:,.0f} tok/s", flush=True)
        if step % args.eval_every == 0 or step == steps:
            monitor_eval(step)
        elif args.time_limit and time.perf_counter() - t_train > args.time_limit:
            print(f"time limit {args.time_limit:g}s reached at step {step}", flush=True)
            stopped_early = True
            monitor_eval(step)
            break
    jax.block_until_ready(params)
    train_seconds = time.perf_counter() - t_train
    timed = train_seconds - (t_first - t_train) - eval_seconds
    tokens_per_second = (step - 1) * tokens_per_step / timed if step > 1 and timed > 0 else 0.0
    timings["train"] = round(train_seconds, 2)
    timings["train_monitor_evals"] = round(eval_seconds, 2)
    t = lap("train", t)

    # 4. validation loss of the shipped (bf16) weights, in float32 --------------------------
    shipped = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), best[2])
    with jax.default_matmul_precision("highest"):
        eval_window_losses = make_window_losses(eval_graphdef)
        heldout_loss = mean_loss(eval_window_losses, shipped, windows, eval_batch)
        shipped_loss = mean_loss(eval_window_losses, shipped, windows[shipped_idx], eval_batch)
        samples = []
        if args.sample_tokens:
            samples = greedy_samples(eval_graphdef, shipped, tok, SAMPLE_PROMPTS, args.sample_tokens,
                                     special_id, min(256, args.max_position_embeddings))
    print(f"held-out loss {heldout_loss:.4f} over {len(windows)} windows; shipped windows "
          f"{shipped_loss:.4f} over {len(shipped_idx)}", flush=True)
    t = lap("eval", t)

    # 5. the checkpoint directory ---------------------------------------------------------
    model = nnx.merge(eval_graphdef, shipped)
    models.save_hf_checkpoint(model, out, dtype=jnp.bfloat16)
    config = json.loads((out / "config.json").read_text()) | hf  # ours wins: ids, dtype, rope
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": special_id, "eos_token_id": special_id, "pad_token_id": special_id,
    }, indent=2) + "\n")
    write_tokenizer_files(tok, out, corpus.SPECIAL_TOKEN, args.max_position_embeddings)
    np.save(out / "heldout_eval.npy", windows[shipped_idx].astype(np.uint16 if data["vocab_size"] <= 65536 else np.int32))
    (out / "heldout_files.txt").write_text("".join(f.rel + "\n" for f in heldout_files))
    metrics = {
        "command": shlex.join(["python", "training/train_default_model.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args), "data": data, "params": n_params,
        "steps_planned": planned_steps, "steps_scheduled": steps, "replanned_for_time_limit": replanned,
        "steps_run": step, "stopped_early": stopped_early, "warmup_steps": warmup,
        "best_step": best[1], "tokens_seen": step * tokens_per_step,
        "epochs_seen": round(step * tokens_per_step / len(train_stream), 2),
        "train_seconds": round(train_seconds, 1), "tokens_per_second": round(tokens_per_second),
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "jax": jax.__version__, "optax": optax.__version__,
        "heldout_loss": round(heldout_loss, 5), "shipped_windows_loss": round(shipped_loss, 5),
        "heldout_bytes_per_token": round(data["heldout_bytes"] / data["heldout_tokens"], 4),
        "history": history, "evals": evals, "timings": timings, "samples": samples,
        "safetensors_bytes": (out / "model.safetensors").stat().st_size,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out / "README.md", metrics, config)
    lap("export", t)
    print(f"wrote {out} in {time.perf_counter() - t_start:.0f}s", flush=True)
    return metrics


if __name__ == "__main__":
    main()
