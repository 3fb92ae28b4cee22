"""Structured outputs through the whole engine, on the shipped default model at temperature 0.7
over many seeds: every finished output of a JSON-schema, regex, choice or EBNF request is valid;
free requests beside constrained ones get the tokens they get alone; bad specs are ValueErrors
with the backend's message; an equal schema hits the compiled-grammar cache."""

import re

import jsonschema
import pytest

from jaxengine import LLM, SamplingParams, StructuredOutputsParams
from tests.jaxengine.structured_output.schemas import CHOICES, EBNF, PERSON, REGEX, loads, matches_ebnf

SEEDS = range(12)
PROMPT = "def main():\n    config = "


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", progress=False, max_num_seqs=16, max_num_batched_tokens=256, seed=0)


def _params(so: StructuredOutputsParams, seed: int, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.7, top_p=0.95, seed=seed, max_tokens=max_tokens, structured_outputs=so)


def _finished(outs) -> list[str]:
    """The texts of outputs that finished with "stop"; most must have (else the test says nothing)."""
    done = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(done) >= 0.75 * len(outs), [o.outputs[0].finish_reason for o in outs]
    return done


def test_json_schema_outputs_validate(llm):
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    outs = llm.generate([PROMPT] * len(SEEDS), [_params(so, s, 160) for s in SEEDS])
    for text in _finished(outs):
        jsonschema.validate(loads(text), PERSON)


def test_json_schema_with_free_whitespace_validates(llm):
    """vLLM's default (any whitespace): this model likes newlines, so fewer finish in budget."""
    outs = llm.generate([PROMPT] * 6, [_params(StructuredOutputsParams(json=PERSON), s, 400) for s in range(6)])
    done = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done, [o.outputs[0].finish_reason for o in outs]
    for text in done:
        jsonschema.validate(loads(text), PERSON)


def test_json_object_outputs_parse(llm):
    so = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    outs = llm.generate([PROMPT] * 6, [_params(so, s, 200) for s in range(6)])
    done = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done
    for text in done:
        assert isinstance(loads(text), dict)


def test_regex_choice_and_ebnf_outputs_match(llm):
    kinds = [StructuredOutputsParams(regex=REGEX), StructuredOutputsParams(choice=CHOICES),
             StructuredOutputsParams(grammar=EBNF)]
    params = [_params(so, s, 48) for so in kinds for s in SEEDS]
    outs = llm.generate([PROMPT] * len(params), params)
    n = len(SEEDS)
    regex, choice, ebnf = outs[:n], outs[n:2 * n], outs[2 * n:]
    for text in _finished(regex):
        assert re.fullmatch(REGEX, text), text
    assert all(o.outputs[0].finish_reason == "stop" for o in choice)
    assert {o.outputs[0].text for o in choice} <= set(CHOICES)
    for text in _finished(ebnf):
        assert matches_ebnf(text), text


def test_greedy_constrained_output_validates(llm):
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=160, structured_outputs=
                                                  StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)))
    assert out.outputs[0].finish_reason == "stop"
    jsonschema.validate(loads(out.outputs[0].text), PERSON)


def test_free_requests_unchanged_by_constrained_neighbours(llm):
    prompts = ["import os\n", "class A:\n", "def g(y):\n", "x = ["]
    free = [SamplingParams(temperature=0.7, seed=100 + i, max_tokens=24) for i in range(len(prompts))]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free)]
    so = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    mixed_prompts, mixed_params = [], []
    for i, (p, f) in enumerate(zip(prompts, free)):
        mixed_prompts += [p, PROMPT]
        mixed_params += [f, _params(so, i, 64)]
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [o.outputs[0].token_ids for o in mixed[::2]] == alone


@pytest.mark.parametrize("so, message", [
    (dict(regex="a(b"), "parenthesis is not closed"),
    (dict(json={"type": "frobnicate"}), "frobnicate"),
    (dict(grammar="root ::= missing"), 'Rule "missing" is not defined'),
])
def test_invalid_specs_are_value_errors_with_the_backends_message(llm, so, message):
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**so))
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([PROMPT], params)
    # The engine goes on serving.
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_repeated_schema_hits_the_grammar_cache(llm):
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]}
    manager = llm.engine.structured_outputs()
    before = manager.cache_stats.hits, manager.cache_stats.misses
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    llm.generate([PROMPT], _params(so, 0, 16))
    # The same schema with its keys in another order is the same grammar.
    again = StructuredOutputsParams(json={"required": ["k"], "properties": {"k": {"enum": [1, 2]}}, "type": "object"},
                                    disable_any_whitespace=True)
    outs = llm.generate([PROMPT] * 2, [_params(again, 1, 16), _params(so, 2, 16)])
    assert (manager.cache_stats.hits - before[0], manager.cache_stats.misses - before[1]) == (2, 1)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and loads(o.outputs[0].text)["k"] in (1, 2)
