"""The sampler's host-side inputs (jaxengine/sample/metadata.py): static rows and the per-step builder."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np

from jaxengine.sample.metadata import (
    SamplerVariant,
    SamplingTensors,
    StaticSampling,
    build_sampling_metadata,
    seed_to_words,
)
from jaxengine.sampling_params import MAX_LOGPROBS, SamplingParams


def _scheduled(params: SamplingParams, prompt: list[int], outputs: list[int]) -> SimpleNamespace:
    """A decode of a request with these prompt and output tokens (a ScheduledRequest's fields)."""
    tokens = prompt + outputs
    req = SimpleNamespace(sampling_params=params, eos_token_ids=(2,), all_token_ids=tokens, num_tokens=len(tokens),
                          num_prompt_tokens=len(prompt))
    return SimpleNamespace(request=req, num_tokens=1, start_position=len(tokens) - 1)


def test_static_rows_are_written_once_and_gathered_by_slot():
    table = StaticSampling.neutral(3)
    table.write(2, SamplingParams(temperature=0.5, top_k=-1, top_p=0.25, repetition_penalty=1.5), seed=-1)
    rows = table.take(np.array([2, 0, 2]))
    assert rows.temperature.tolist() == [0.5, 0.0, 0.5] and rows.top_k.tolist() == [0, 0, 0]
    assert rows.top_p.tolist() == [0.25, 1.0, 0.25] and rows.repetition_penalty.tolist() == [1.5, 1.0, 1.5]
    assert rows.seeds.tolist() == [list(seed_to_words(-1)), [0, 0], list(seed_to_words(-1))]
    grown = table.extended(2)
    assert len(grown.temperature) == 5
    assert all((a[-2:] == b).all() for a, b in zip(grown, StaticSampling.neutral(2)))


def test_padding_rows_are_greedy_and_need_no_variant():
    out = build_sampling_metadata(StaticSampling.neutral(4), np.arange(4, dtype=np.int32), [], [])
    assert out.variant == SamplerVariant(num_logprobs=0, use_top_k_top_p=False, use_penalties=False, all_greedy=True)
    assert set(vars(out.tensors)) == {f.name for f in dataclasses.fields(SamplingTensors)}
    assert (out.tensors.logit_bias_ids == -1).all() and (out.tensors.penalty_token_ids == -1).all()


def test_per_step_rows():
    params = [
        SamplingParams(temperature=1.0, top_k=5),  # row 0: needs the top-k sort, no per-step work
        SamplingParams(min_tokens=3, stop_token_ids=[7], logit_bias={9: 1.5}),  # row 1: 2 outputs so far
        SamplingParams(presence_penalty=0.5, logprobs=2),  # row 2
    ]
    sched = [_scheduled(params[0], [1, 1], [3]), _scheduled(params[1], [4], [5, 6]), _scheduled(params[2], [8], [9])]
    table = StaticSampling.neutral(4)
    for i, p in enumerate(params):
        table.write(i + 1, p, seed=i)
    out = build_sampling_metadata(table.take(np.array([1, 2, 3, 0])), np.arange(4, dtype=np.int32), sched, [1, 2])
    assert out.variant == SamplerVariant(num_logprobs=MAX_LOGPROBS, use_top_k_top_p=True, use_penalties=True,
                                         all_greedy=False)
    t = out.tensors
    # min_tokens not reached: the stop token and EOS are banned beside the request's own bias.
    bias = {int(i): float(v) for i, v in zip(t.logit_bias_ids[1], t.logit_bias_values[1]) if i >= 0}
    assert bias == {9: 1.5, 7: -math.inf, 2: -math.inf}
    assert (t.logit_bias_ids[[0, 2, 3]] == -1).all()
    # Penalties read the row's prompt and output ids, outputs marked.
    assert t.penalty_token_ids[2, :2].tolist() == [8, 9] and t.penalty_is_output[2, :2].tolist() == [False, True]
    assert (t.penalty_token_ids[[0, 1, 3]] == -1).all()
