"""Tools in chat templates, and the scripted tool model (tool_model.py): the engine renders
`tools`, an assistant's `tool_calls` and a tool result's `tool_call_id` through the chat
template; the scripted model answers any prompt with its script, exactly, which the hermes
parser then reads as the same calls, whole or streamed."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

from jaxengine import LLM, SamplingParams
from jaxengine.engine.data_parallel import DataParallelEngine
from jaxengine.engine.tokenizer import apply_chat_template, load_tokenizer, validate_messages
from serving.openai_api.tool_parsers import HermesToolParser
from tests.serving.openai_api.tool_model import TOOL_ENGINE_ARGS, WEATHER_TOOL, write_tool_model

# Content, two calls, repeated pieces (quotes, braces, the tags) and non-ASCII text.
SCRIPT = ('Checking both… 天气 🌧\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n</tool_call>')
GREEDY = SamplingParams(temperature=0, max_tokens=400)  # the script is ~200 tokens
CALL_ID = "call_0123456789abcdef01234567"
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C, sunny"},
    {"role": "user", "content": "And Zürich?"},
]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    return write_tool_model(tmp_path_factory.mktemp("tool-model"), SCRIPT)


@pytest.fixture(scope="module")
def llm(tool_model):
    return LLM(str(tool_model), progress=False, **TOOL_ENGINE_ARGS)


# --------------------------------------------------------------------------- the scripted model


def test_any_prompt_gets_exactly_the_script(llm):
    prompts = ["hello", "def fibonacci(n):\n", [1, 2, 3]]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for o in outs:
        assert o.outputs[0].text == SCRIPT
        assert o.outputs[0].finish_reason == "stop"
    # One token per script position, the last one EOS (not in the text).
    assert len(set(outs[0].outputs[0].token_ids)) == len(outs[0].outputs[0].token_ids)


def test_streamed_script_reads_as_the_same_calls_as_the_whole(llm):
    parser = HermesToolParser()
    deltas = []
    for out in llm.stream("hi", GREEDY):
        deltas.append(parser.extract_streaming(out.outputs[0].text))
    deltas.append(parser.finish())
    assert len(deltas) > 20  # the script arrives token by token
    whole = HermesToolParser().extract(SCRIPT)
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich", "unit": "celsius"})]
    assert whole.content == "Checking both… 天气 🌧\n"
    assert "".join(d.content or "" for d in deltas) == whole.content
    streamed = [t for d in deltas for t in d.tool_calls]
    assert [t.name for t in streamed if t.name] == ["get_weather", "get_weather"]
    assert [t.arguments for t in streamed if t.id is None] == [c.arguments for c in whole.tool_calls]


# --------------------------------------------------------------------------- tools through the template

WANT_PROMPT = (
    "<s><|system|>Be brief.\n\nYou may call functions. Their signatures, within <tools></tools>:\n<tools>\n"
    + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>\n"
    'For each call, answer <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|end|>'
    "<|user|>Weather in Paris?<|end|>"
    '<|assistant|><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|end|>'
    f'<|tool|><tool_response id="{CALL_ID}">18 C, sunny</tool_response><|end|>'
    "<|user|>And Zürich?<|end|><|assistant|>"
)


def test_chat_renders_tools_calls_and_results(llm):
    history = copy.deepcopy(HISTORY)
    out = llm.chat(history, GREEDY, tools=[WEATHER_TOOL], use_tqdm=False)[0]
    assert llm.tokenizer.decode(out.prompt_token_ids) == WANT_PROMPT
    assert out.outputs[0].text == SCRIPT
    assert history == HISTORY  # the caller's messages are not changed (arguments stay JSON text)


def test_without_tools_the_template_renders_no_tools(tool_model):
    tok = load_tokenizer(tool_model)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(apply_chat_template(tok, msgs)) == "<s><|user|>hi<|end|><|assistant|>"
    # Positional (tokenizer, messages, chat_template, tools) works too.
    with_tools = tok.decode(apply_chat_template(tok, msgs, None, [WEATHER_TOOL]))
    assert with_tools.startswith("<s><|system|>You may call functions.") and '"get_weather"' in with_tools


def test_engine_chat_token_ids_takes_tools(llm):
    want = apply_chat_template(llm.tokenizer, HISTORY, tools=[WEATHER_TOOL])
    assert llm.engine.chat_token_ids(HISTORY, tools=[WEATHER_TOOL]) == want
    assert llm.engine.chat_token_ids(HISTORY) == apply_chat_template(llm.tokenizer, HISTORY)
    # A data-parallel engine renders on its first replica, tools included.
    seen = []
    replica = SimpleNamespace(chat_token_ids=lambda messages, tools=None: seen.append((messages, tools)) or [7])
    assert DataParallelEngine.chat_token_ids(SimpleNamespace(replicas=[replica]), HISTORY, [WEATHER_TOOL]) == [7]
    assert seen == [(HISTORY, [WEATHER_TOOL])]


def test_validate_messages_keeps_tool_fields_and_parses_call_arguments():
    msgs = validate_messages(HISTORY)
    assert msgs[2]["content"] is None
    assert msgs[2]["tool_calls"][0] == {"id": CALL_ID, "type": "function",
                                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert msgs[3]["tool_call_id"] == CALL_ID
    # No content key at all is fine for a message of calls; arguments that are not an object stay text.
    calls = [{"type": "function", "function": {"name": "f", "arguments": "not json"}}]
    assert validate_messages([{"role": "assistant", "tool_calls": calls}])[0] == {
        "role": "assistant", "tool_calls": calls, "content": None}


@pytest.mark.parametrize("messages,error", [
    ([{"role": "assistant", "content": None}], "content'] must be a str"),
    ([{"role": "assistant"}], "is missing 'content'"),
    ([{"role": "user", "content": "x", "tool_calls": [{}]}], "only assistant messages make calls"),
    ([{"role": "assistant", "content": "", "tool_calls": "f()"}], r"tool_calls'\] must be a list"),
    ([{"role": "assistant", "content": "", "tool_calls": ["f"]}], r"tool_calls'\]\[0\] must be a dict"),
])
def test_bad_tool_messages_are_value_errors(messages, error):
    with pytest.raises(ValueError, match=error):
        validate_messages(messages)


@pytest.mark.parametrize("tools,error", [(WEATHER_TOOL, "tools must be a list"), (["get_weather"], r"tools\[0\] must be a dict")])
def test_bad_tools_are_value_errors(tool_model, tools, error):
    tok = load_tokenizer(tool_model)
    with pytest.raises(ValueError, match=error):
        apply_chat_template(tok, [{"role": "user", "content": "hi"}], tools=tools)
