"""Clients that go away: a stream closed mid-way, or a non-streaming request given up, aborts
its engine request (the server then has nothing running and every KV block free, long
before the request would have ended), and a bounded load test: 200 concurrent streams, some
closed early, the rest finishing with the right finish reasons, the engine idle afterwards."""

from __future__ import annotations

import asyncio
import random
import time

import openai
import pytest

from jaxengine import SamplingParams
from tests.serving.openai_api.conftest import API_KEY, scrape, wait_idle

LONG = dict(max_tokens=160, temperature=0.0, extra_body=dict(ignore_eos=True))  # ~2 s on 2 CPU cores


@pytest.fixture(scope="module")
def full_run(client) -> float:
    """Seconds a LONG request takes when nobody leaves: what an abort must beat by far."""
    t0 = time.monotonic()
    resp = client.completions.create(model="default", prompt="def f(x):", **LONG)
    assert resp.usage.completion_tokens == 160
    return time.monotonic() - t0


def test_closing_a_stream_aborts_its_request(client, api_server, full_run):
    port = api_server.http_port
    assert wait_idle(port)["jaxengine:num_requests_running"] == 0
    for create in (client.completions.create, client.chat.completions.create):
        kw = dict(prompt="def f(x):") if create == client.completions.create else dict(
            messages=[{"role": "user", "content": "hi"}])
        stream = create(model="default", stream=True, **kw, **LONG)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        m = scrape(port)
        assert m["jaxengine:num_requests_running"] == 1 and m["jaxengine:kv_cache_usage_perc"] > 0
        stream.close()
        closed = time.monotonic()
        m = wait_idle(port, timeout=30)
        assert m["jaxengine:num_requests_running"] == 0 and m["jaxengine:kv_cache_usage_perc"] == 0, m
        assert time.monotonic() - closed < full_run / 3, full_run  # aborted, not run to its end


def test_leaving_a_non_streaming_request_aborts_it(client, api_server, full_run):
    port = api_server.http_port
    wait_idle(port)
    with pytest.raises(openai.APITimeoutError):  # the client gives up and closes its connection
        client.with_options(timeout=full_run / 6).completions.create(model="default", prompt="def f(x):", **LONG)
    left = time.monotonic()
    m = wait_idle(port, timeout=30)
    assert m["jaxengine:num_requests_running"] == 0 and m["jaxengine:kv_cache_usage_perc"] == 0, m
    assert time.monotonic() - left < full_run / 3, full_run


async def _one(c: openai.AsyncOpenAI, i: int, prompt: str, max_tokens: int, leave_after: int | None) -> dict:
    stream = await c.completions.create(model="default", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body=dict(ignore_eos=True))
    text, finish, usage, pieces = "", None, None, 0
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
            pieces += 1
            if leave_after is not None and pieces >= leave_after:
                return dict(i=i, left=True)
    return dict(i=i, left=False, text=text, finish=finish, usage=usage)


def test_200_concurrent_streams_some_leaving_early(api_server, llm):
    prompts = ["def", "class", "import", "for"]  # short: prefill is most of the engine's work here
    rng = random.Random(0)
    jobs = [(i, prompts[i % len(prompts)], rng.randint(1, 4), rng.choice([None, None, None, 1, 2])) for i in range(200)]
    want = {p: llm.generate(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
            for p in prompts}

    async def run() -> list[dict]:
        async with openai.AsyncOpenAI(base_url=api_server.base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(_one(c, *job) for job in jobs))

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    left = [r for r in results if r["left"]]
    done = [r for r in results if not r["left"]]
    assert 20 < len(left) < 100 and len(done) == 200 - len(left)
    for r in done:
        i, prompt, max_tokens, _ = jobs[r["i"]]
        assert r["finish"] == "length" and r["usage"].completion_tokens == max_tokens, r
        # Greedy, so the engine's own first max_tokens tokens, however the batch was made up.
        assert r["text"] == llm.tokenizer.decode(want[prompt].outputs[0].token_ids[:max_tokens]), r
    m = wait_idle(api_server.http_port, timeout=30)
    assert m["jaxengine:num_requests_running"] == 0 and m["jaxengine:num_requests_waiting"] == 0, m
    assert m["jaxengine:kv_cache_usage_perc"] == 0, m
    assert elapsed < 60, elapsed
    print(f"200 streams in {elapsed:.1f}s")
