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

import typing

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxengine.sample.metadata import SamplerVariant, SamplingTensors
from jaxengine.worker.model_runner import ModelRunner
from jaxengine.worker.step_inputs import META_FIELDS, SAMPLING_FIELDS, StepInputs
from models.attention_metadata import AttentionMetadata

_STOP, _STEP = 0, 1
# The arrays a follower needs: StepInputs' own and its meta's and sampling's leaves (every
# array of a step but prompt_slots, which only the leader's outputs read).
_TOP = ("tokens", "token_src", "prompt_rows", "prompt_targets")
_ARRAYS = (*_TOP, *(f"meta.{f}" for f in META_FIELDS), *(f"sampling.{f}" for f in SAMPLING_FIELDS))
_DTYPES = (np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.bool_))
_VARIANT_TYPES = tuple(typing.get_type_hints(SamplerVariant).values())  # int, bool, ...
_MAX_NDIM = 2
# The header: cmd, num_seqs, the SamplerVariant's fields, then per array of _ARRAYS its
# dtype's index in _DTYPES (-1: absent), its ndim and its shape (padded to _MAX_NDIM).
_HEAD = 2 + len(SamplerVariant._fields)
_PER_ARRAY = 2 + _MAX_NDIM
_HEADER = _HEAD + _PER_ARRAY * len(_ARRAYS)


def _broadcast(tree, is_source: bool):
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree, is_source=is_source))


def _array(inputs: StepInputs, name: str) -> np.ndarray | None:
    obj = inputs
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _header(inputs: StepInputs) -> np.ndarray:
    h = np.zeros(_HEADER, np.int32)
    h[:_HEAD] = (_STEP, inputs.num_seqs, *inputs.variant)
    for i, name in enumerate(_ARRAYS):
        a, at = _array(inputs, name), _HEAD + i * _PER_ARRAY
        if a is None:
            h[at] = -1
        else:
            assert a.ndim <= _MAX_NDIM, (name, a.shape)
            h[at : at + 2 + a.ndim] = (_DTYPES.index(a.dtype), a.ndim, *a.shape)
    return h


def _arrays(inputs: StepInputs) -> dict[str, np.ndarray]:
    """The arrays of StepInputs by _ARRAYS' names (bools as int32: what is broadcast)."""
    tree = {}
    for name in _ARRAYS:
        if (a := _array(inputs, name)) is not None:
            tree[name] = a.astype(np.int32) if a.dtype == np.bool_ else a
    return tree


def _specs(h: np.ndarray) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each present array's dtype and shape, from a header."""
    specs = {}
    for i, name in enumerate(_ARRAYS):
        at = _HEAD + i * _PER_ARRAY
        if h[at] >= 0:
            specs[name] = (_DTYPES[h[at]], tuple(int(d) for d in h[at + 2 : at + 2 + h[at + 1]]))
    return specs


def _template(h: np.ndarray) -> dict[str, np.ndarray]:
    """Zeros shaped like the leader's arrays, as `_arrays` gives them."""
    return {name: np.zeros(shape, np.int32 if dtype == np.bool_ else dtype) for name, (dtype, shape) in _specs(h).items()}


def _inputs(h: np.ndarray, tree: dict[str, np.ndarray]) -> StepInputs:
    """The leader's StepInputs, from its header and its broadcast arrays."""
    arrays = {name: tree[name].astype(dtype, copy=False) for name, (dtype, _) in _specs(h).items()}
    return StepInputs(
        **{name: arrays.get(name) for name in _TOP},
        meta=AttentionMetadata(**{f: arrays[f"meta.{f}"] for f in META_FIELDS}),
        sampling=SamplingTensors(**{f: arrays[f"sampling.{f}"] for f in SAMPLING_FIELDS}),
        variant=SamplerVariant(*(t(v) for t, v in zip(_VARIANT_TYPES, h[2:_HEAD]))),
        num_seqs=int(h[1]),
    )


class Leader:
    """Process 0's side: broadcast each step's inputs, then run it like everyone else."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, inputs: StepInputs, prev_token_ids: jax.Array | None = None):
        _broadcast(_header(inputs), True)
        _broadcast(_arrays(inputs), True)
        return self.runner.execute(inputs, prev_token_ids)

    def stop(self) -> None:
        h = np.zeros(_HEADER, np.int32)
        h[0] = _STOP
        _broadcast(h, True)


def follow(runner: ModelRunner) -> int:
    """A follower's loop: replay the leader's steps until it stops; returns the step count."""
    prev = None
    steps = 0
    while True:
        h = _broadcast(np.zeros(_HEADER, np.int32), False)
        if h[0] == _STOP:
            return steps
        inputs = _inputs(h, _broadcast(_template(h), False))
        prev = runner.execute(inputs, None if prev is None else prev[0].token_ids)
        steps += 1
