"""Structured outputs over HTTP with the official `openai` client, on the shipped default model
(the engine in its own process): `response_format` json_schema / json_object content validates, a
tool call's arguments validate against the tool's schema when `tool_choice` names it (or is
"required"), whole and streamed; bad schemas are 400s with the backend's message."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.jaxengine.structured_output.schemas import PERSON

MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]
SAMPLED = dict(temperature=0.7, top_p=0.95)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_response_format_json_schema_content_validates(client):
    done = 0
    for seed in range(4):
        resp = client.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=200, seed=seed, response_format=_json_schema(PERSON),
            **SAMPLED)
        choice = resp.choices[0]
        if choice.finish_reason == "stop":
            done += 1
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert done >= 3


def test_response_format_json_object_streamed(client):
    stream = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=300, seed=1, stream=True,
                                            response_format={"type": "json_object"}, **SAMPLED)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_arguments_validate(client, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    calls = []
    for seed in range(3):
        kw = dict(model="default", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                  tool_choice=choice, max_tokens=120, seed=seed, **SAMPLED)
        if not stream:
            resp = client.chat.completions.create(**kw)
            assert resp.choices[0].finish_reason == "stop"  # OpenAI's for a forced function
            assert resp.choices[0].message.content is None
            calls += resp.choices[0].message.tool_calls
        else:
            names, args, finish = [], "", None
            for chunk in client.chat.completions.create(stream=True, **kw):
                for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    names += [d.function.name] if d.function.name else []
                    args += d.function.arguments or ""
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            assert finish == "stop" and names == ["get_weather"]
            calls.append(openai.types.chat.ChatCompletionMessageToolCall(
                id="call_x", type="function", function={"name": names[0], "arguments": args}))
    assert len(calls) == 3
    for call in calls:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_choice_calls_validate(client):
    resp = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Time?"}],
                                          tools=TOOLS, tool_choice="required", max_tokens=200, seed=5, **SAMPLED)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_bad_schema_is_400_with_the_backends_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4,
                                       response_format=_json_schema({"type": "frobnicate"}))
    assert 'Unsupported type "frobnicate"' in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="x", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "(("}})
    assert "structured_outputs.regex" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, tools=TOOLS,
                                       tool_choice="required", response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"


def test_completions_structured_outputs_extra(client):
    resp = client.completions.create(model="default", prompt="colour = ", max_tokens=8, seed=2,
                                     extra_body={"structured_outputs": {"choice": ["red", "blue"]}}, **SAMPLED)
    assert resp.choices[0].text in ("red", "blue") and resp.choices[0].finish_reason == "stop"
