"""Several processes, one host loop: the leader (process 0) schedules; followers replay.

With `jax.distributed` every process must launch the same device programs in the same order
(a sharded step is one program across all processes' devices). Only process 0 runs the
scheduler, the tokenizer and the service; before each step it broadcasts the step's host
inputs (StepInputs: a fixed header giving the shapes, then the arrays) with JAX's own
`broadcast_one_to_all`, and every follower runs `ModelRunner.execute` on them. Followers
keep the previous step's sampled tokens on their devices, as the leader does, for async
scheduling. The leader ends the followers' loop with a stop header.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxengine.worker.model_runner import ModelRunner, StepInputs
from jaxengine.sample.sampler import SamplingTensors
from models.attention_metadata import AttentionMetadata

_STOP, _STEP = 0, 1
# cmd, T, S, max_pages, B (logit bias width), L (penalty width), R (prompt-logprob rows),
# has token_src, num_logprobs, use_top_k_top_p, use_penalties, all_greedy, num_seqs
_HEADER = 13


def _broadcast(tree, is_source: bool):
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree, is_source=is_source))


def _arrays(inputs: StepInputs) -> dict:
    """The device-bound part of StepInputs as a dict of int32/float32/uint32 arrays (bools as int32)."""
    tree = {
        "tokens": inputs.tokens, "meta": dataclasses.asdict(inputs.meta),
        "sampling": {k: (v.astype(np.int32) if v.dtype == np.bool_ else v)
                     for k, v in dataclasses.asdict(inputs.sampling).items()},
    }
    if inputs.token_src is not None:
        tree["token_src"] = inputs.token_src
    if inputs.prompt_rows is not None:
        tree["prompt_rows"], tree["prompt_targets"] = inputs.prompt_rows, inputs.prompt_targets
    return tree


def _template(h: np.ndarray) -> dict:
    """Zeros shaped like the leader's arrays, from its header."""
    t, s, p, b, l_, r, has_src = (int(x) for x in h[1:8])
    z = lambda *shape, dtype=np.int32: np.zeros(shape, dtype)  # noqa: E731
    f = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    tree = {
        "tokens": z(t),
        "meta": {"positions": z(t), "slot_mapping": z(t), "kv_lens": z(s), "page_indices": z(s, p),
                 "cu_q_lens": z(s + 1), "num_seqs": z(1), "logits_indices": z(s)},
        "sampling": {"temperature": f(s), "top_k": z(s), "top_p": f(s), "min_p": f(s), "repetition_penalty": f(s),
                     "presence_penalty": f(s), "frequency_penalty": f(s), "seeds": z(s, 2, dtype=np.uint32),
                     "positions": z(s), "logit_bias_ids": z(s, b), "logit_bias_values": f(s, b),
                     "penalty_token_ids": z(s, l_), "penalty_is_output": z(s, l_)},
    }
    if has_src:
        tree["token_src"] = z(t)
    if r:
        tree["prompt_rows"], tree["prompt_targets"] = z(r), z(r)
    return tree


def _header(inputs: StepInputs) -> np.ndarray:
    s = inputs.sampling
    return np.array([
        _STEP, inputs.tokens.shape[0], s.temperature.shape[0], inputs.meta.page_indices.shape[1],
        s.logit_bias_ids.shape[1], s.penalty_token_ids.shape[1],
        0 if inputs.prompt_rows is None else inputs.prompt_rows.shape[0], inputs.token_src is not None,
        inputs.num_logprobs, inputs.use_top_k_top_p, inputs.use_penalties, inputs.all_greedy, inputs.num_seqs,
    ], np.int32)


class Leader:
    """Process 0's side: broadcast each step's inputs, then run it like everyone else."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, inputs: StepInputs, prev_token_ids=None):
        _broadcast(_header(inputs), True)
        _broadcast(_arrays(inputs), True)
        return self.runner.execute(inputs, prev_token_ids)

    def stop(self) -> None:
        _broadcast(np.array([_STOP] + [0] * (_HEADER - 1), np.int32), True)


def follow(runner: ModelRunner) -> int:
    """A follower's loop: replay the leader's steps until it stops; returns the step count."""
    prev = None
    steps = 0
    while True:
        h = _broadcast(np.zeros(_HEADER, np.int32), False)
        if h[0] == _STOP:
            return steps
        tree = _broadcast(_template(h), False)
        sampling = {k: (v.astype(np.bool_) if k == "penalty_is_output" else v) for k, v in tree["sampling"].items()}
        inputs = StepInputs(
            tokens=tree["tokens"], meta=AttentionMetadata(**tree["meta"]), sampling=SamplingTensors(**sampling),
            num_logprobs=int(h[8]), use_top_k_top_p=bool(h[9]), use_penalties=bool(h[10]), all_greedy=bool(h[11]),
            num_seqs=int(h[12]), prompt_rows=tree.get("prompt_rows"), prompt_targets=tree.get("prompt_targets"),
            token_src=tree.get("token_src"),
        )
        prev = runner.execute(inputs, None if prev is None else prev[0].token_ids)
        steps += 1
