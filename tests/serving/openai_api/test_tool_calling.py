"""Tool calling end to end: `jaxengine serve --tool-call-parser hermes --enable-auto-tool-choice`
of the scripted tool model (tool_model.py: any prompt gets the script, a Hermes-style answer
with two calls), through the `openai` client: `message.tool_calls` and finish_reason
"tool_calls", whole and streamed as `delta.tool_calls`, the tools rendered into the prompt.
Then, last (it stops this module's server), SIGTERM drains the HTTP API: health 503, new
requests 503, the stream in flight aborted after --drain-timeout, exit code 0."""

from __future__ import annotations

import json
import signal
import time

import httpx2
import openai
import pytest

from jaxengine.engine.tokenizer import apply_chat_template, load_tokenizer
from serving.openai_api.tool_parsers import HermesToolParser
from tests.serving.openai_api.tool_model import TOOL_ENGINE_ARGS, WEATHER_TOOL, write_tool_model
from tests.serving.serve_process import ServeProcess

SCRIPT = ('On it…\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>')
WANT = HermesToolParser().extract(SCRIPT)  # what the parser reads in it, as the server should
MESSAGES = [{"role": "user", "content": "Weather in Paris and Zürich?"}]
CALL_ID = "call_0123456789abcdef01234567"
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 C, sunny"},
    {"role": "user", "content": "And Zürich?"},
]
ASK = dict(max_tokens=300, temperature=0.0)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    return write_tool_model(tmp_path_factory.mktemp("tool-model"), SCRIPT)


@pytest.fixture(scope="module")
def tool_server(tool_model):
    # The engine on a thread (--no-engine-process): a faster start, and the other way to run.
    srv = ServeProcess("--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--served-model-name", "tools",
                       "--drain-timeout", "0.5", "--no-engine-process", model=str(tool_model), http=True,
                       **TOOL_ENGINE_ARGS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def tc(tool_server):
    with openai.OpenAI(base_url=tool_server.base_url, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _prompt_len(tool_model, messages, tools=None) -> int:
    return len(apply_chat_template(load_tokenizer(tool_model), messages, tools=tools))


def test_tool_calls_whole(tc, tool_model):
    want = WANT
    assert len(want.tool_calls) == 2 and want.content
    resp = tc.chat.completions.create(model="tools", messages=MESSAGES, tools=[WEATHER_TOOL], **ASK)
    (choice,) = resp.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == want.content
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", c.name, json.loads(c.arguments)) for c in want.tool_calls]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    # The tools were rendered into the prompt by the chat template.
    assert resp.usage.prompt_tokens == _prompt_len(tool_model, MESSAGES, [WEATHER_TOOL])
    assert resp.usage.prompt_tokens > _prompt_len(tool_model, MESSAGES) + 50


def test_tool_calls_streamed(tc):
    chunks = list(tc.chat.completions.create(model="tools", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True,
                                             **ASK))
    assert chunks[0].choices[0].delta.role == "assistant"
    content, calls = "", {}
    for c in chunks:
        d = c.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            if t.id is not None:  # a call's first delta: its id and name
                assert t.index not in calls and t.type == "function"
                calls[t.index] = dict(id=t.id, name=t.function.name, arguments=t.function.arguments or "")
            else:
                calls[t.index]["arguments"] += t.function.arguments
    assert content == WANT.content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.name, json.loads(c.arguments)) for c in WANT.tool_calls]
    assert len({c["id"] for c in calls.values()}) == 2
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_tool_choice_none_is_plain_text(tc, tool_model):
    resp = tc.chat.completions.create(model="tools", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none",
                                      **ASK)
    choice = resp.choices[0]
    assert choice.message.content == SCRIPT and not choice.message.tool_calls and choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == _prompt_len(tool_model, MESSAGES)  # the tools stay out of the prompt


def test_history_with_calls_and_results_renders(tc, tool_model):
    resp = tc.chat.completions.create(model="tools", messages=HISTORY, tools=[WEATHER_TOOL], **ASK)
    assert resp.usage.prompt_tokens == _prompt_len(tool_model, HISTORY, [WEATHER_TOOL])
    assert resp.choices[0].finish_reason == "tool_calls"


def test_sigterm_drains_the_http_api(tc, tool_server):
    """Last in this module: it stops the server."""
    base = f"http://127.0.0.1:{tool_server.http_port}"
    # ignore_eos: the scripted model repeats its script, so this runs far past the drain timeout.
    stream = tc.completions.create(model="tools", prompt="hi", max_tokens=900, temperature=0.0, stream=True,
                                   extra_body=dict(ignore_eos=True))
    chunks = iter(stream)
    next(chunks)
    tool_server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx2.get(f"{base}/health", timeout=5).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = httpx2.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "abort" and finishes.count("abort") == 1  # cut off after --drain-timeout
    assert tool_server.proc.wait(timeout=60) == 0, tool_server.log
    assert "stopped (1 requests aborted)" in tool_server.log, tool_server.log
