"""/v1/completions (and /v1/models, /tokenize, /detokenize) of a real `jaxengine serve`,
through the official `openai` client, against `LLM.generate` on the same model."""

from __future__ import annotations

import httpx2
import pytest

from jaxengine import SamplingParams
from jaxengine.config import default_model_dir
from models.loading.generation_config import sampling_defaults
from tests.serving.openai_api.conftest import API_KEY

PROMPT = "def fibonacci(n):"
GREEDY = dict(temperature=0.0)
DEFAULTS = sampling_defaults(default_model_dir())  # what the server fills unset fields with


def _want(llm, prompt, **params):
    """LLM.generate's output for what the server runs: `params` over the server's defaults."""
    return llm.generate(prompt, SamplingParams(**(DEFAULTS | params)), use_tqdm=False)[0]


def test_models_lists_the_served_model(client, api_server):
    models = client.models.list().data
    assert [m.id for m in models] == ["default"]
    assert models[0].max_model_len == 512 and models[0].owned_by == "jaxengine"


def test_greedy_completion_is_the_engines(client, llm):
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=24, **GREEDY)
    want = _want(llm, PROMPT, max_tokens=24, **GREEDY)
    (choice,) = resp.choices
    assert choice.text == want.outputs[0].text and choice.index == 0
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "text_completion" and resp.model == "default" and resp.id.startswith("cmpl-")


def test_return_token_ids_gives_the_engines_tokens(client, llm):
    """vLLM's `return_token_ids`: the ids beside the text, whole and streamed (the prompt's in
    the first chunk); absent when not asked for."""
    kw = dict(model="default", prompt=PROMPT, max_tokens=12, **GREEDY)
    want = _want(llm, PROMPT, max_tokens=12, **GREEDY)
    whole = client.completions.create(extra_body=dict(return_token_ids=True), **kw).choices[0]
    assert whole.token_ids == list(want.outputs[0].token_ids)
    assert whole.prompt_token_ids == list(want.prompt_token_ids)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, extra_body=dict(return_token_ids=True), **kw)
              if c.choices]
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids
    assert all(getattr(c, "prompt_token_ids", None) is None for c in chunks[1:])
    plain = client.completions.create(**kw).choices[0]
    assert "token_ids" not in plain.model_dump(exclude_unset=True)


def test_max_tokens_defaults_to_16_as_openai(client):
    resp = client.completions.create(model="default", prompt=PROMPT, extra_body=dict(ignore_eos=True), **GREEDY)
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_stream_adds_up_to_the_whole(client):
    kw = dict(model="default", prompt=PROMPT, max_tokens=20, **GREEDY)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert len(chunks) > 3  # token by token, not one piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_unset_sampling_fields_take_generation_config(client, llm):
    """No temperature / top_p in the request: the model's generation_config.json values, as
    vLLM's --generation-config auto (the default model's: 0.7 / 0.95)."""
    assert DEFAULTS["temperature"] > 0 and DEFAULTS["top_p"] < 1
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=16, seed=11)
    want = llm.generate(PROMPT, SamplingParams(max_tokens=16, seed=11, **DEFAULTS), use_tqdm=False)[0]
    assert resp.choices[0].text == want.outputs[0].text
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=16, seed=11), use_tqdm=False)[0]
    assert plain.outputs[0].text != want.outputs[0].text  # so the defaults made the difference


def test_seed_reproduces_and_another_seed_differs(client, llm):
    kw = dict(model="default", prompt=PROMPT, max_tokens=24, temperature=1.0)
    a, b = (client.completions.create(seed=3, **kw).choices[0].text for _ in range(2))
    other = client.completions.create(seed=4, **kw).choices[0].text
    assert a == b == _want(llm, PROMPT, max_tokens=24, temperature=1.0, seed=3).outputs[0].text
    assert other != a


def test_n_choices_are_the_engines_samples(client, llm):
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, n=3, temperature=1.0, seed=9)
    want = _want(llm, PROMPT, max_tokens=12, n=3, temperature=1.0, seed=9)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [o.text for o in want.outputs]
    assert resp.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)


def test_batch_of_prompts_numbers_choices_by_prompt_then_sample(client, llm):
    prompts = [PROMPT, "class Stack:"]
    resp = client.completions.create(model="default", prompt=prompts, max_tokens=6, n=2, **GREEDY)
    want = [_want(llm, p, max_tokens=6, **GREEDY).outputs[0].text for p in prompts]
    assert [(c.index, c.text) for c in resp.choices] == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]
    streamed: dict[int, str] = {}
    for c in client.completions.create(model="default", prompt=prompts, max_tokens=6, n=2, stream=True, **GREEDY):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {c.index: c.text for c in resp.choices}


def test_token_id_prompt_and_echo(client, llm):
    ids = llm.tokenizer.encode(PROMPT)
    want = _want(llm, ids, max_tokens=8, **GREEDY).outputs[0].text
    resp = client.completions.create(model="default", prompt=ids, max_tokens=8, echo=True, **GREEDY)
    assert resp.choices[0].text == llm.tokenizer.decode(ids, skip_special_tokens=True) + want
    text = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, echo=True, **GREEDY)
    assert text.choices[0].text == PROMPT + want


def test_logprobs_are_the_engines(client, llm):
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    want = _want(llm, PROMPT, max_tokens=6, logprobs=3, **GREEDY).outputs[0]
    lp = resp.choices[0].logprobs
    decode = lambda t: llm.tokenizer.decode([t])  # noqa: E731
    assert lp.tokens == [decode(t) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-5)
    for top, entry in zip(lp.top_logprobs, want.logprobs):
        ranked = {decode(t): x.logprob for t, x in entry.items() if x.rank is not None and x.rank <= 3}
        assert top == pytest.approx(ranked, abs=1e-5)  # greedy: the sampled token is the top one
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # echo + logprobs: the prompt's tokens first (the first has no logprob), then the completion's.
    echoed = client.completions.create(model="default", prompt=PROMPT, max_tokens=6, logprobs=1, echo=True, **GREEDY)
    elp = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert elp.token_logprobs[0] is None and all(x is not None for x in elp.token_logprobs[1:])
    assert elp.tokens[n_prompt:] == lp.tokens
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert elp.text_offset[n_prompt] == len(PROMPT)


def test_stop_string(client, llm):
    want = _want(llm, PROMPT, max_tokens=40, stop=["\n"], **GREEDY).outputs[0]
    assert want.finish_reason == "stop"  # the stop string is reached, so this tests something
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=40, stop="\n", **GREEDY)
    assert resp.choices[0].text == want.text and "\n" not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].model_extra["stop_reason"] == "\n"


def test_cached_tokens_on_a_repeated_long_prefix(client, llm):
    prompt = "import os\nimport sys\n" + "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(12))
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert n_prompt > 4 * 16  # several KV blocks of 16 tokens
    first = client.completions.create(model="default", prompt=prompt, max_tokens=4, **GREEDY)
    second = client.completions.create(model="default", prompt=prompt, max_tokens=4, **GREEDY)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == n_prompt
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < n_prompt and cached % 16 == 0
    assert second.choices[0].text == first.choices[0].text


def test_tokenize_and_detokenize(api_server, llm):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = f"http://127.0.0.1:{api_server.http_port}"
    ids = llm.tokenizer.encode(PROMPT)
    r = httpx2.post(f"{base}/tokenize", json={"prompt": PROMPT}, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    messages = [{"role": "user", "content": "hi"}]
    r = httpx2.post(f"{base}/tokenize", json={"messages": messages}, headers=headers, timeout=30)
    assert r.json()["tokens"] == llm.engine.chat_token_ids(messages)
    r = httpx2.post(f"{base}/detokenize", json={"tokens": ids}, headers=headers, timeout=30)
    assert r.status_code == 200 and r.json() == {"prompt": llm.tokenizer.decode(ids)}
    r = httpx2.post(f"{base}/detokenize", json={"tokens": [10**7]}, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
