import dataclasses
import math

import pytest

from jaxengine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias == {}
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert p.logprobs is None and p.prompt_logprobs is None
    assert not p.is_greedy


def test_greedy_is_temperature_zero():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


def test_normalisation():
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=5).top_k == 5
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(logit_bias={"7": 1, 8: -2.5}).logit_bias == {7: 1.0, 8: -2.5}
    assert SamplingParams(max_tokens=None).max_tokens is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"n": 1.5}, "n must be an integer >= 1, got 1.5"),
        ({"temperature": -0.1}, "temperature must be >= 0 and finite, got -0.1"),
        ({"temperature": math.nan}, "temperature must be >= 0 and finite, got nan"),
        ({"temperature": math.inf}, "temperature must be >= 0 and finite, got inf"),
        ({"temperature": "1"}, "temperature must be >= 0 and finite, got '1'"),
        ({"top_p": 0.0}, "top_p must be > 0 and <= 1 and finite, got 0.0"),
        ({"top_p": 1.01}, "top_p must be > 0 and <= 1 and finite, got 1.01"),
        ({"top_k": -2}, "top_k must be -1 or 0 (disabled) or an integer >= 1, got -2"),
        ({"top_k": 2.0}, "top_k must be -1 or 0 (disabled) or an integer >= 1, got 2.0"),
        ({"min_p": 1.5}, "min_p must be >= 0 and <= 1 and finite, got 1.5"),
        ({"min_p": -0.5}, "min_p must be >= 0 and <= 1 and finite, got -0.5"),
        ({"presence_penalty": 2.5}, "presence_penalty must be >= -2 and <= 2 and finite, got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be >= -2 and <= 2 and finite, got -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 and finite, got 0.0"),
        ({"repetition_penalty": math.nan}, "repetition_penalty must be > 0 and finite, got nan"),
        ({"seed": 1.0}, "seed must be None or a 64-bit integer, got 1.0"),
        ({"seed": 2**64}, "seed must be None or a 64-bit integer"),
        ({"stop": ""}, "stop strings must be non-empty"),
        ({"stop": ["a", 3]}, "stop must be a string or a list of strings, got ['a', 3]"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, f"stop must have at most {MAX_STOP_STRINGS} strings, got 17"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids must be a list of integers >= 0, got [1, -1]"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"max_tokens": 0}, "max_tokens must be None or an integer >= 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be <= max_tokens (10), got 20"),
        ({"logprobs": MAX_LOGPROBS + 1}, f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got 21"),
        ({"logprobs": -1}, "logprobs must be None or an integer in [0, 20], got -1"),
        ({"prompt_logprobs": 100}, "prompt_logprobs must be None or an integer in [0, 20], got 100"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids >= 0, got -1"),
        ({"logit_bias": {5: 101.0}}, "logit_bias[5] must be in [-100, 100] and finite, got 101.0"),
        ({"logit_bias": {5: math.nan}}, "logit_bias[5] must be in [-100, 100] and finite, got nan"),
        ({"logit_bias": [1, 2]}, "logit_bias must be a dict"),
    ],
)
def test_validation_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_boundaries_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=1, min_p=1.0, presence_penalty=-2,
                   frequency_penalty=2, repetition_penalty=1e-3, seed=0, logprobs=0,
                   prompt_logprobs=MAX_LOGPROBS, stop=["x"] * MAX_STOP_STRINGS,
                   min_tokens=16, max_tokens=16, logit_bias={0: -100, 1: 100})


def test_replace_revalidates():
    p = SamplingParams(temperature=0.7, stop="x")
    q = dataclasses.replace(p, n=1, seed=3)
    assert q.stop == ["x"] and q.seed == 3
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(p, temperature=-1)
