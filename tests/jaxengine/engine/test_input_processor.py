"""Prompts and `n` checked where they enter, with one rule and one message for every way in
(LLM.generate, jaxengine.generate, Engine.add_request, AsyncEngine.generate): bytes are a
TypeError, text that cannot be encoded (a lone surrogate) and empty prompts a ValueError
(naming the prompt's index in a list), n above max_n a ValueError naming max_n. The shipped
default model (it has a tokenizer), kept small."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import jaxengine
from jaxengine import AsyncEngine, EngineConfig, SamplingParams
from jaxengine.config import default_model_dir
from jaxengine.engine.input_processor import EMPTY_PROMPT, InputProcessor
from jaxengine.engine.tokenizer import load_tokenizer
from jaxengine.entrypoints.llm import _cached_llm

ARGS = dict(dtype="float32", max_model_len=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
            num_kv_blocks=64, max_n=4)
ONE = SamplingParams(max_tokens=2, temperature=0)
BYTES = "str or a list of int token ids"


@pytest.fixture(scope="module")
def llm():
    return _cached_llm(None, tuple(sorted(ARGS.items())))  # the engine jaxengine.generate(**ARGS) uses


def _generate(prompts, params=ONE):
    return jaxengine.generate(prompts, params, **ARGS)


def _idle(llm) -> bool:
    engine = llm.engine
    return not engine.has_unfinished_requests() and engine.scheduler.kv_cache_manager.block_pool.usage == 0


@pytest.mark.parametrize("prompt", [b"def f():", bytearray(b"x"), memoryview(b"x")], ids=["bytes", "bytearray", "view"])
def test_bytes_prompt_is_a_type_error(llm, prompt):
    with pytest.raises(TypeError, match=BYTES):
        llm.generate(prompt, ONE)
    with pytest.raises(TypeError, match=BYTES):
        _generate(prompt)
    with pytest.raises(TypeError, match=r"prompts\[1\]: .*decode the bytes"):
        llm.generate(["ok", prompt], ONE)
    with pytest.raises(TypeError, match=BYTES):
        llm.engine.add_request(prompt, ONE)
    assert _idle(llm)


def test_lone_surrogate_is_a_value_error_naming_the_prompt(llm):
    with pytest.raises(ValueError, match=r"prompts\[2\]: .*UTF-8.*character 3 is a lone surrogate"):
        llm.generate(["def f():", "x = 1", "abc\ud800def"], ONE)
    with pytest.raises(ValueError, match="surrogate") as e:
        _generate("\udfff")
    assert "prompts[" not in str(e.value)  # one prompt: no index to name
    with pytest.raises(ValueError, match="surrogate"):
        llm.engine.add_request("a\ud800", ONE)
    assert _idle(llm)  # the first prompts of the list were not left queued


@pytest.mark.parametrize("empty", ["", []], ids=["text", "token-ids"])
def test_empty_prompt_is_a_value_error_everywhere(llm, empty):
    # (generate([]) is a batch of no prompts, as in vLLM: [[]] is one empty prompt.)
    for call in (lambda: llm.generate([empty], ONE), lambda: _generate([empty]),
                 lambda: llm.engine.add_request(empty, ONE)):
        with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):
            call()
    with pytest.raises(ValueError, match=r"prompts\[1\]: The decoder prompt cannot be empty"):
        llm.generate(["x", empty], ONE)
    with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):
        llm.engine.add_core_request([], ONE, request_id="core-empty")
    assert _idle(llm)


def test_async_engine_applies_the_same_rules(llm):
    async def first_error(prompt):
        try:
            async for _ in async_engine.generate(prompt, ONE):
                pass
        except (TypeError, ValueError) as e:
            return e
        return None

    async def run():
        return [await first_error(p) for p in (b"x", "\ud800", "", [1, 2, 3])]

    async_engine = AsyncEngine(llm.engine)
    try:
        bytes_err, surrogate_err, empty_err, ok = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert isinstance(bytes_err, TypeError) and BYTES in str(bytes_err)
    assert isinstance(surrogate_err, ValueError) and "surrogate" in str(surrogate_err)
    assert isinstance(empty_err, ValueError) and EMPTY_PROMPT in str(empty_err)
    assert ok is None


def test_n_above_max_n_is_a_value_error_naming_max_n(llm):
    with pytest.raises(ValueError, match="n=5 is above this engine's max_n=4"):
        llm.generate([1, 2, 3], SamplingParams(n=5, max_tokens=2))
    with pytest.raises(ValueError, match="max_n=4"):
        _generate("def f():", SamplingParams(n=5, max_tokens=2))
    with pytest.raises(ValueError, match="max_n=4"):
        llm.engine.add_request([1, 2, 3], SamplingParams(n=5))
    out = llm.generate([1, 2, 3], SamplingParams(n=4, max_tokens=2, temperature=1.0, seed=0))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert _idle(llm)


def test_engine_keeps_serving_after_bad_prompts(llm):
    out = llm.generate(["def add(a, b):", [5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert _idle(llm)


@pytest.mark.parametrize("max_n", [0, -1, 1.5, True, None])
def test_max_n_must_be_a_positive_integer(max_n):
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        EngineConfig(max_n=max_n)
    assert EngineConfig().max_n == 128  # vLLM's default


def test_input_processor_prompt_forms():
    p = InputProcessor(tokenizer=load_tokenizer(default_model_dir()), vocab_size=8192, max_model_len=64, max_n=2)
    assert p.prompt_token_ids([1, 2]) == (None, [1, 2])
    assert p.prompt_token_ids((3, 4)) == (None, [3, 4])
    assert p.prompt_token_ids(np.array([5, 6]))[1] == [5, 6]
    text, ids = p.prompt_token_ids("def f():")
    assert text == "def f():" and ids and all(isinstance(t, int) for t in ids)
    assert p.prompt_token_ids("é ü")[0] == "é ü"  # non-ASCII but valid: fine
    for bad in (None, 7, 1.5):
        with pytest.raises(TypeError, match=BYTES):
            p.prompt_token_ids(bad)
    with pytest.raises(ValueError, match=r"in \[0, 8192\)"):
        p.check_request([1, 8192], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len=64"):
        p.check_request([1] * 60, SamplingParams(max_tokens=5))
    p.check_request([1] * 59, SamplingParams(max_tokens=5, n=2))
