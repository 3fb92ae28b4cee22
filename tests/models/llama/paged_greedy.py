"""A minimal paged forward/greedy loop for model tests: each sequence gets its own run of
pages, the whole batch runs as one ragged step. (The engine's runner does this for real.)"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from models import AttentionMetadata, CausalLM

PAGE = 8


def ragged_step_inputs(chunks: list[list[int]], starts: list[int], pages_per_seq: int):
    """Tokens [T] and metadata for running `chunks[s]` of sequence s from position starts[s]."""
    tokens, positions, slots, cu, logit_rows = [], [], [], [0], []
    tables = np.array([[1 + s * pages_per_seq + p for p in range(pages_per_seq)] for s in range(len(chunks))], np.int32)
    for s, (chunk, start) in enumerate(zip(chunks, starts)):
        for i, tok in enumerate(chunk):
            pos = start + i
            tokens.append(tok)
            positions.append(pos)
            slots.append(tables[s, pos // PAGE] * PAGE + pos % PAGE)
        cu.append(cu[-1] + len(chunk))
        logit_rows.append(cu[-1] - 1)
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    meta = AttentionMetadata(
        positions=i32(positions), slot_mapping=i32(slots),
        kv_lens=i32([s + len(c) for s, c in zip(starts, chunks)]), page_indices=i32(tables),
        cu_q_lens=i32(cu), num_seqs=i32([len(chunks)]), logits_indices=i32(logit_rows),
    )
    return i32(tokens), meta


def empty_caches(model: CausalLM, num_seqs: int, pages_per_seq: int, dtype=jnp.float32):
    cfg = model.config
    return [
        pallas_kernels.init_kv_cache(1 + num_seqs * pages_per_seq, PAGE, cfg.num_kv_heads, cfg.head_dim, dtype)
        for _ in range(cfg.num_layers)
    ]


@jax.jit
def _forward(graphdef, state, caches, tokens, meta):
    model = nnx.merge(graphdef, state)
    hidden, caches = model(tokens, caches, meta)
    return model.compute_logits(hidden), caches


def prompt_logits(model: CausalLM, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits at every prompt position, all prompts in one ragged step."""
    pages = -(-max(map(len, prompts)) // PAGE)
    tokens, meta = ragged_step_inputs(prompts, [0] * len(prompts), pages)
    graphdef, state = nnx.split(model)
    logits, _ = _forward(graphdef, state, empty_caches(model, len(prompts), pages), tokens, meta)
    cu = np.asarray(meta.cu_q_lens)
    return [np.asarray(logits[cu[s]:cu[s + 1]]) for s in range(len(prompts))]


def greedy(model: CausalLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Prefill all prompts in one step, then decode them together one token per step."""
    pages = -(-(max(map(len, prompts)) + max_new_tokens) // PAGE)
    graphdef, state = nnx.split(model)
    caches = empty_caches(model, len(prompts), pages)
    chunks, starts = [list(p) for p in prompts], [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tokens, meta = ragged_step_inputs(chunks, starts, pages)
        logits, caches = _forward(graphdef, state, caches, tokens, meta)
        nxt = np.asarray(jnp.argmax(logits[meta.logits_indices], axis=-1))
        for s in range(len(prompts)):
            out[s].append(int(nxt[s]))
            starts[s] += len(chunks[s])
            chunks[s] = [int(nxt[s])]
    return out
