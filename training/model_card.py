"""The README.md model card of the default model, written from the recipe's metrics."""

from __future__ import annotations

from pathlib import Path

# Greedy continuations of these go in the card (and tests check the same kind of prompts).
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef ",
    "class Stack:\n    def __init__(self):",
]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def write_model_card(path: Path, m: dict, config: dict) -> None:
    d, a = m["data"], m["args"]
    py = d["python"]
    py_minor = ".".join(py.split(".")[:2])
    tests = ("included (the installation has `test/`)" if d["has_test_dirs"]
             else "not present in this installation, so not included")
    samples = "\n\n".join(f"```python\n{s}\n```" for s in m["samples"]) or "(none recorded)"
    if a["stdlib"]:
        root_note = (f"a copy at `{d['stdlib_root']}` given by `--stdlib`; the recipe ran under "
                     f"Python {d['recipe_python']}")
    else:
        root_note = f"`sysconfig.get_paths()[\"stdlib\"]` of the training machine, `{d['stdlib_root']}`"
    stdlib_args = f" --stdlib {a['stdlib']} --stdlib-version {py}" if a["stdlib"] else ""
    copy_note = (f" `{a['stdlib']}` held the `.py` files of a CPython {py} `lib/python{py_minor}` "
                 "(site-packages left out), copied there with `tar`." if a["stdlib"] else "")
    hist = m["evals"]
    steps_note = ""
    if m["replanned_for_time_limit"]:
        steps_note += f" (planned {m['steps_planned']}, re-planned to fit --time-limit {a['time_limit']:g}s)"
    if m["stopped_early"]:
        steps_note += " (stopped at --time-limit before the schedule ended)"
    evals = ", ".join(f"{e['step']}: {e['heldout_loss_monitor']:.3f}" for e in hist)
    text = f"""---
license: other
license_name: psf-2.0
license_link: https://docs.python.org/3/license.html
library_name: transformers
pipeline_tag: text-generation
tags: [llama, python, code, jaxengine]
---

# jaxengine default model: a tiny Llama trained on the CPython {py_minor} standard library

The model `jaxengine` runs when no other is named. It is small enough to live in the
package ({_mb(m["safetensors_bytes"])} of bf16 weights) and was trained from scratch in
{m["train_seconds"]:.0f} s on one {m["device"]}, so it writes Python that *looks* like the standard
library: plausible syntax, names and idioms, little real logic. It is a test fixture and a
first-run demo, not an assistant.

```
jaxengine generate "def fibonacci(n):"
```

or with `transformers`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR)
model = AutoModelForCausalLM.from_pretrained(DIR)
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids   # starts with <|endoftext|>
print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0], skip_special_tokens=True))
```

## Model

| | |
| --- | --- |
| architecture | `LlamaForCausalLM` (RMSNorm, SwiGLU MLP, RoPE θ={config["rope_theta"]:g}, grouped-query attention) |
| layers / hidden / MLP | {config["num_hidden_layers"]} / {config["hidden_size"]} / {config["intermediate_size"]} |
| attention heads / KV heads / head dim | {config["num_attention_heads"]} / {config["num_key_value_heads"]} / {config["head_dim"]} |
| vocabulary | {config["vocab_size"]} (byte-level BPE) |
| context | {config["max_position_embeddings"]} tokens (trained on windows of {a["seq_len"]}) |
| embeddings | tied (the LM head is the token embedding) |
| parameters | {m["params"]:,} |
| weights | `model.safetensors`, bfloat16, {m["safetensors_bytes"]:,} bytes |

## Corpus

The `.py` files of the CPython {py} standard library ({root_note}), licensed under the
[PSF License](https://docs.python.org/3/license.html). site-packages/dist-packages are
excluded; files that are not UTF-8 ({d["skipped"]["not_utf8"]}) or do not compile
({d["skipped"]["syntax_error"]}, the test suite's deliberately broken files) are skipped; test
directories: {tests}. {a["card_note"]}

| split | files | bytes | tokens |
| --- | --- | --- | --- |
| train | {d["train_files"]} | {d["train_bytes"]:,} | {d["train_tokens"]:,} |
| held-out | {d["heldout_files"]} | {d["heldout_bytes"]:,} | {d["heldout_tokens"]:,} |

A file is held out when `int(sha256(relative_path).hexdigest()[:8], 16) % 100 < {a["heldout_percent"]}`, so
the split is the same on every machine; `heldout_files.txt` lists the held-out files.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the train split: GPT-2 pre-tokenization, no
normalisation, all 256 bytes in the base alphabet (any text round-trips), vocabulary
{d["vocab_size"]}. `<|endoftext|>` (id {config["bos_token_id"]}) is BOS, EOS and padding; the tokenizer
prepends it to every encoding, and every file of the corpus starts with it, so the model
emits it where a file would end. {d["heldout_bytes"] / d["heldout_tokens"]:.2f} bytes per token on the held-out split.

## Training

| | |
| --- | --- |
| code | `training/train_default_model.py` (JAX + Flax NNX + optax, the engine's own `models.CausalLM`) |
| steps | {m["steps_run"]}{steps_note}; weights shipped from step {m["best_step"]} (best held-out loss seen) |
| batch | {a["batch_size"]} windows × {a["seq_len"] + 1} tokens, random offsets into the train stream |
| tokens seen | {m["tokens_seen"]:,} ({m["epochs_seen"]} epochs of the train split) |
| optimizer | AdamW (β = 0.9, 0.95; weight decay {a["weight_decay"]} on matrices), global-norm clip {a["grad_clip"]} |
| learning rate | linear warm-up over {m["warmup_steps"]} steps to {a["lr"]:g}, cosine decay to {a["lr"] * a["min_lr_ratio"]:g} at step {m["steps_scheduled"]} |
| precision | bfloat16 compute, float32 master weights; shipped as bfloat16 |
| seed | {a["seed"]} |
| device | {m["device"]} ({m["platform"]}, jax {m["jax"]}, optax {m["optax"]}) |
| time | {m["train_seconds"]:.0f} s of training (compilation included), {m["tokens_per_second"]:,} tokens/s |

Held-out loss during training (step: loss on {min(128, d["heldout_windows"])} evenly spaced held-out windows): {evals}.

## Validation loss

Mean token cross-entropy in nats over the held-out split: the held-out files, each encoded
as `<|endoftext|>` + text, are concatenated in sorted path order and cut into consecutive,
non-overlapping windows of {a["seq_len"] + 1} tokens (window *i* = tokens `[{a["seq_len"]}i, {a["seq_len"]}i + {a["seq_len"] + 1})`, the
tail that fills no window dropped); each window's first {a["seq_len"]} tokens are the input (positions
0..{a["seq_len"] - 1}) and its last {a["seq_len"]} the targets. Computed in float32 (highest matmul precision) on
the bfloat16 weights of `model.safetensors`.

- Held-out loss, all {d["heldout_windows"]} windows ({d["heldout_windows"] * a["seq_len"]:,} targets): **{m["heldout_loss"]:.4f}** nats/token
  (perplexity {2.718281828 ** m["heldout_loss"]:.2f}, about {m["heldout_loss"] / 0.693147 / m["heldout_bytes_per_token"]:.3f} bits per byte).
- Loss on the shipped windows (`heldout_eval.npy`): **{m["shipped_windows_loss"]:.4f}** nats/token.
  `heldout_eval.npy` holds {d["shipped_windows"]} of those windows, evenly spaced (uint16 token ids,
  shape [{d["shipped_windows"]}, {a["seq_len"] + 1}]), so the number can be re-computed on any machine, whatever its
  Python version, in seconds on a CPU; `tests/models/test_default_model.py` does so with
  `transformers` (PyTorch, float32) and requires agreement within 1%.

## Greedy samples

{samples}

## Reproduce

```
{m["command"]}
```

The same schedule without the time limit: `python training/train_default_model.py --out DIR
--seed {a["seed"]} --steps {m["steps_scheduled"]}{stdlib_args}` (on a GPU; bitwise equality across devices is not
expected). A CPU smoke run of the recipe (a few steps on 40 files) is in
`tests/models/test_default_model.py`.{copy_note} `python training/model_card.py DIR` rewrites this card
from `training_metrics.json` and `config.json`.

The corpus is whatever stdlib the recipe reads (here CPython {py}'s); another version gives
another corpus, tokenizer and model.

## Limitations

Six million parameters and eight million tokens of training text: the model knows the
shape of stdlib code (indentation, docstrings, `self.` attributes, imports, common names)
but not what the code should do. Greedy decoding soon repeats itself (the same line or
phrase over and over, see the samples above); sampling (temperature 0.7-1.0) reads better.
`tests/models/test_default_model.py` checks that `compile()` accepts the first completed
statement or block of the greedy continuations of 8 stdlib-style prompts for at least 5 of them.
"""
    path.write_text(text)


if __name__ == "__main__":  # python training/model_card.py DIR: rewrite DIR/README.md
    import json
    import sys

    out = Path(sys.argv[1])
    write_model_card(out / "README.md", json.loads((out / "training_metrics.json").read_text()),
                     json.loads((out / "config.json").read_text()))
