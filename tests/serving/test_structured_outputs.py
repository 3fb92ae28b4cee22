"""Structured outputs over gRPC: a JSON-schema request's text validates, and specs the backend
cannot compile are INVALID_ARGUMENT with its message (the server keeps serving)."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from serving.generated import engine_pb2 as pb
from tests.jaxengine.structured_output.schemas import PERSON
from tests.serving.conftest import collect, request


def test_json_schema_output_validates(stub):
    so = pb.StructuredOutputs(json=json.dumps(PERSON), disable_any_whitespace=True)
    texts = []
    for seed in range(4):
        resps, result = collect(stub, request("def f(x):", max_tokens=140, temperature=0.7, seed=seed,
                                              structured_outputs=so))
        assert resps[-1].outputs[-1].finish_reason == pb.FINISH_REASON_STOP
        texts.append(result.text)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_choice_output_is_one_of_them(stub):
    so = pb.StructuredOutputs(choice=pb.Choices(choices=["alpha", "beta"]))
    _, result = collect(stub, request("hi", max_tokens=8, temperature=0.7, seed=3, structured_outputs=so))
    assert result.text in ("alpha", "beta")


@pytest.mark.parametrize("so, words", [
    (pb.StructuredOutputs(regex="(ab"), ["structured_outputs.regex", "parenthesis"]),
    (pb.StructuredOutputs(json='{"type": "object"'), ["structured_outputs.json", "not valid JSON"]),
    (pb.StructuredOutputs(json='{"type": "wat"}'), ["structured_outputs.json", 'Unsupported type "wat"']),
    (pb.StructuredOutputs(grammar="root ::= nothing_here"), ["structured_outputs.grammar", "nothing_here"]),
    (pb.StructuredOutputs(disable_any_whitespace=True), ["structured_outputs", "one of"]),
])
def test_bad_specs_are_invalid_argument(stub, so, words):
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request("hi", max_tokens=4, structured_outputs=so))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for w in words:
        assert w in e.value.details()
    _, result = collect(stub, request("hi", max_tokens=2))
    assert result.token_ids
