"""/v1/chat/completions of a real `jaxengine serve` of the shipped model (whose chat template
writes the conversation as a Python comment), through the `openai` client, against
`LLM.chat`; and the tool-choice rules on a server without a tool parser."""

from __future__ import annotations

import openai
import pytest

from jaxengine import SamplingParams
from tests.serving.openai_api.test_completions import DEFAULTS

MESSAGES = [{"role": "system", "content": "Python 3."}, {"role": "user", "content": "A function that reverses a string."}]
GREEDY = dict(temperature=0.0)


def _want(llm, messages=MESSAGES, **params):
    return llm.chat(messages, SamplingParams(**(DEFAULTS | params)), use_tqdm=False)[0]


def test_chat_is_llm_chat(client, llm):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20, **GREEDY)
    want = _want(llm, max_tokens=20, **GREEDY)
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == want.outputs[0].text
    assert not choice.message.tool_calls and choice.finish_reason == want.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_chat_stream_role_then_content_then_finish_and_usage(client, llm):
    want = _want(llm, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    body = [c for c in chunks[1:] if c.choices]
    assert len(body) > 3 and all(c.choices[0].delta.role is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == want.outputs[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == want.outputs[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_completion_tokens_wins_and_n_samples(client, llm):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=30, max_completion_tokens=5,
                                          n=2, temperature=1.0, seed=21)
    want = _want(llm, max_tokens=5, n=2, temperature=1.0, seed=21)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == [o.text for o in want.outputs]
    assert resp.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs) <= 10


def test_text_parts_and_developer_role(client, llm):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Python 3."}]},
             {"role": "user", "content": [{"type": "text", "text": "A function that reverses a string."}]}]
    resp = client.chat.completions.create(model="default", messages=parts, max_tokens=8, **GREEDY)
    assert resp.choices[0].message.content == _want(llm, max_tokens=8, **GREEDY).outputs[0].text


def test_chat_logprobs_are_the_engines(client, llm):
    resp = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5, logprobs=True,
                                          top_logprobs=2, **GREEDY)
    want = _want(llm, max_tokens=5, logprobs=2, **GREEDY).outputs[0]
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == [llm.tokenizer.decode([t]) for t in want.token_ids]
    assert [c.logprob for c in content] == pytest.approx([e[t].logprob for t, e in zip(want.token_ids, want.logprobs)],
                                                         abs=1e-5)
    for c, t, entry in zip(content, want.token_ids, want.logprobs):
        assert c.bytes == list(c.token.encode())
        ranked = sorted((x.rank, tid, x.logprob) for tid, x in entry.items() if x.rank is not None and x.rank <= 2)
        assert [(x.token, x.logprob) for x in c.top_logprobs] == [
            (llm.tokenizer.decode([tid]), pytest.approx(lp, abs=1e-5)) for _, tid, lp in ranked]
    streamed = [lp for c in client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=5,
                                                           logprobs=True, top_logprobs=2, stream=True, **GREEDY)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in content]
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in content], abs=1e-5)


def test_auto_tools_need_a_parser_and_a_named_tool_must_exist(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=MESSAGES, tools=[tool], max_tokens=4)
    assert "--enable-auto-tool-choice" in e.value.message and e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="'g', which is not in tools") as e:
        client.chat.completions.create(model="default", messages=MESSAGES, tools=[tool], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "g"}})
    # "none": no parsing, and the tools stay out of the prompt.
    resp = client.chat.completions.create(model="default", messages=MESSAGES, tools=[tool], tool_choice="none",
                                          max_tokens=4, **GREEDY)
    plain = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, **GREEDY)
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert resp.usage.prompt_tokens == plain.usage.prompt_tokens
