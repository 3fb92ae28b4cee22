"""Structured outputs on small random checkpoints (a real BPE tokenizer, random weights), at
temperature 0.7 over many seeds: the grammar alone keeps the near-uniform samples valid."""

import re

import jsonschema
import pytest

from jaxengine import LLM, SamplingParams, StructuredOutputsParams
from tests.jaxengine.structured_output.schemas import CHOICES, EBNF, PERSON, REGEX, loads, matches_ebnf
from tests.serving.tiny_model import ENGINE_ARGS, write_tiny_model


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def llm(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp(f"random{request.param}"), seed=request.param)
    return LLM(str(path), progress=False, **{**ENGINE_ARGS, "max_model_len": 512, "num_kv_blocks": 1024})


def test_every_finished_output_validates(llm):
    kinds = [StructuredOutputsParams(json=PERSON, disable_any_whitespace=True), StructuredOutputsParams(regex=REGEX),
             StructuredOutputsParams(choice=CHOICES), StructuredOutputsParams(grammar=EBNF)]
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=300, structured_outputs=so)
              for so in kinds for s in range(8)]
    outs = llm.generate(["def f(x):"] * len(params), params)
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons.count("stop") >= 0.9 * len(outs), reasons
    checks = [lambda t: jsonschema.validate(loads(t), PERSON), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t),
              lambda t: t in CHOICES or pytest.fail(t), lambda t: matches_ebnf(t) or pytest.fail(t)]
    for i, out in enumerate(outs):
        if out.outputs[0].finish_reason == "stop":
            checks[i // 8](out.outputs[0].text)
