"""AsyncEngine streams: a consumer that falls behind gets the steps it missed merged into
one delta (nothing lost, nothing repeated), so a busy server sends fewer, larger messages."""

from __future__ import annotations

import asyncio

import jaxengine
from jaxengine.outputs import OutputKind
from tests.serving.conftest import wait_idle
from tests.serving.tiny_model import ENGINE_ARGS

PROMPT = "def fibonacci(n):"


async def _stream(async_engine, params, kind, pause_after_first: float):
    outs = []
    async for out in async_engine.generate(PROMPT, params, output_kind=kind):
        outs.append(out)
        if len(outs) == 1:
            await asyncio.sleep(pause_after_first)  # the engine runs on; its outputs pile up
    return outs


def test_slow_consumer_gets_merged_deltas(async_engine, tiny_model):
    params = jaxengine.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    want = jaxengine.generate(PROMPT, params, model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0]
    outs = asyncio.run(_stream(async_engine, params, OutputKind.DELTA, pause_after_first=1.0))
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    assert tokens == want.token_ids
    assert "".join(o.outputs[0].text for o in outs) == want.text
    assert sum(len(o.outputs[0].logprobs) for o in outs) == len(tokens)
    assert outs[-1].outputs[0].cumulative_logprob == want.cumulative_logprob
    assert len(outs) < len(tokens)  # the steps missed during the pause came merged
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].outputs[0].finish_reason == "length"
    assert wait_idle(async_engine)["used_blocks"] == 0


def test_slow_consumer_of_cumulative_outputs_gets_the_newest(async_engine, tiny_model):
    check_slow_cumulative(async_engine, tiny_model)


def check_slow_cumulative(engine, tiny_model) -> None:
    params = jaxengine.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = jaxengine.generate(PROMPT, params, model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0]
    outs = asyncio.run(_stream(engine, params, OutputKind.CUMULATIVE, pause_after_first=1.0))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want.token_ids
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and len(outs) < len(want.token_ids)


def check_stream_interval(engine, tiny_model) -> None:
    """With stream_interval 4 every message carries >= 4 new tokens but the first (sent at
    once, for the time to first token) and the last; nothing is lost."""
    params = jaxengine.SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True)
    want = jaxengine.generate(PROMPT, params, model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0]

    async def run():
        return [o async for o in engine.generate(PROMPT, params)]

    engine.engine.config.stream_interval = 4  # read when a stream starts
    try:
        outs = asyncio.run(run())
    finally:
        engine.engine.config.stream_interval = 1
    sizes = [len(o.outputs[0].token_ids) for o in outs]
    assert [t for o in outs for t in o.outputs[0].token_ids] == want.token_ids
    assert sizes[0] >= 1 and all(n >= 4 for n in sizes[1:-1]) and 1 <= sizes[-1]
    assert len(outs) <= 2 + (23 - sizes[0]) // 4
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_stream_interval(async_engine, tiny_model):
    check_stream_interval(async_engine, tiny_model)
