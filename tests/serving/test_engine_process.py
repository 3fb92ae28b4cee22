"""EngineProcess: the engine loop in a child process behind the same streaming interface as
AsyncEngine. Streams equal the offline engine's greedy output, through the API and through a
real gRPC server; bad input, aborts and calls cross the process boundary; shutdown ends it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import jaxengine
from serving.generated import engine_pb2_grpc
from tests.serving.conftest import collect, request, wait_idle
from tests.serving.test_load import _run_load
from tests.serving.tiny_model import ENGINE_ARGS

PROMPTS = ["def fibonacci(n):", "Hello world"]


@pytest.fixture(scope="module")
def engine_process(tiny_model):
    from jaxengine import EngineConfig
    from jaxengine.engine.engine_process import EngineProcess

    proc = EngineProcess(EngineConfig.from_kwargs(str(tiny_model), **ENGINE_ARGS), progress=False)
    yield proc
    proc.shutdown()
    assert not proc._process.is_alive()


@pytest.fixture(scope="module")
def want(tiny_model):
    params = jaxengine.SamplingParams(max_tokens=24, temperature=0.0)
    return jaxengine.generate(PROMPTS, params, model=str(tiny_model), **ENGINE_ARGS)


async def _tokens(engine, prompt, params, **kw) -> tuple[list[int], str, list]:
    outs = [o async for o in engine.generate(prompt, params, **kw)]
    return [t for o in outs for t in o.outputs[0].token_ids], "".join(o.outputs[0].text for o in outs), outs


def test_streams_match_offline_generate(engine_process, want):
    params = jaxengine.SamplingParams(max_tokens=24, temperature=0.0)

    async def both():
        return await asyncio.gather(*[_tokens(engine_process, p, params) for p in PROMPTS])

    for (tokens, text, outs), w in zip(asyncio.run(both()), want):
        assert tokens == w.outputs[0].token_ids and text == w.outputs[0].text
        assert outs[-1].finished and outs[-1].prompt_token_ids == w.prompt_token_ids  # kept by the client
        assert all(o.prompt_token_ids == w.prompt_token_ids for o in outs)
    assert engine_process.engine.max_model_len == ENGINE_ARGS["max_model_len"]


def test_bad_input_and_bad_calls_raise_here(engine_process):
    async def bad():
        async for _ in engine_process.generate([10**9], jaxengine.SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(ValueError, match="token ids must be integers"):
        asyncio.run(bad())
    with pytest.raises(TypeError, match="module-level function"):
        engine_process.call(lambda e: e.stats()).result(timeout=10)
    assert engine_process.num_unfinished == 0


def test_leaving_a_stream_aborts_and_frees_blocks(engine_process):
    params = jaxengine.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def leave_early():
        n = 0
        async for _ in engine_process.generate("Hello", params):
            n += 1
            if n == 3:
                break

    asyncio.run(leave_early())
    stats = wait_idle(engine_process)
    assert stats["used_blocks"] == 0 and stats["num_running"] == 0 and not stats["unfinished"]


def test_grpc_server_over_engine_process(engine_process, want):
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(engine_process, ServeOptions(port=0, model_name="tiny-process", metrics_port=0))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = engine_pb2_grpc.EngineServiceStub(ch)
            resps, got = collect(stub, request(PROMPTS[0], max_tokens=24, temperature=0.0))
            assert got.token_ids == want[0].outputs[0].token_ids and got.text == want[0].outputs[0].text
            assert resps[-1].usage.prompt_tokens == len(want[0].prompt_token_ids)
            from serving.generated import engine_pb2 as pb

            tok = stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0]))
            assert list(tok.token_ids) == list(want[0].prompt_token_ids)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.model == "tiny-process" and info.num_kv_blocks == engine_process.engine.num_blocks
    finally:
        srv.close()


def test_load_with_cancels_and_deadlines_frees_every_block(engine_process):
    """The load test's 200 concurrent calls (cancels, deadlines) through the engine process."""
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(engine_process, ServeOptions(port=0, model_name="tiny-process"))
    try:
        results = asyncio.run(_run_load(srv.address, seed=1))
        finished = [(kind, code) for kind, (code, *_rest) in results if kind == "normal"]
        assert finished and all(code == grpc.StatusCode.OK for _, code in finished)
        stats = wait_idle(engine_process, timeout=15)
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and not stats["unfinished"], stats
        assert stats["used_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"], stats
        assert engine_process.num_unfinished == 0
        assert not srv.server.servicer.active and srv.server.servicer.num_pending == 0
    finally:
        srv.close()


def test_the_serving_process_leaves_the_device_to_the_engine_process():
    """Building the config and the server must not initialise a JAX backend here: on a GPU
    that would claim most of its memory before the engine process sizes its KV cache."""
    import subprocess
    import sys

    code = (
        "import jaxengine, serving.server, jaxengine.engine.engine_process\n"
        "from jax._src import xla_bridge as xb\n"
        "cfg = jaxengine.EngineConfig.from_kwargs('tiny-llama')\n"
        "srv = serving.server.EngineServer(serving.server.ServeOptions(port=0, model_name='x'))\n"
        "assert not xb._backends, dict(xb._backends)\n"
        "assert cfg.max_num_seqs is None  # resolved by the engine, where the device is\n"
        "print('no backend')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no backend" in out.stdout, out.stderr[-2000:]


def _busy(engine, seconds: float) -> None:  # runs in the engine process
    import time

    time.sleep(seconds)


def test_call_cancelled_while_its_request_is_being_added(engine_process):
    """A caller that gives up before the child has added its request: the request is
    aborted once added, and neither it nor its stream is left behind."""
    params = jaxengine.SamplingParams(max_tokens=50, ignore_eos=True)

    async def scenario():
        hold = engine_process.call(_busy, 0.5)  # the child is busy: the add waits in the pipe
        task = asyncio.ensure_future(_tokens(engine_process, [1, 2, 3], params))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.wait_for(asyncio.wrap_future(hold), 10)

    asyncio.run(scenario())
    stats = wait_idle(engine_process)
    assert stats["used_blocks"] == 0 and not stats["unfinished"], stats
    assert engine_process.num_unfinished == 0


@pytest.mark.parametrize("n", [1, 2])
def test_slow_consumer_gets_merged_deltas_across_the_process(engine_process, tiny_model, n):
    """Token ids cross the pipe per step and the client builds the outputs; a stream combines
    what arrived when it is read: the steps a paused consumer missed come as one delta per
    read, per sample, nothing lost or repeated."""
    from jaxengine.outputs import OutputKind
    from tests.serving.test_async_engine import PROMPT, _stream

    params = jaxengine.SamplingParams(n=n, max_tokens=20, temperature=0.8, seed=7, ignore_eos=True, logprobs=2)
    want = jaxengine.generate(PROMPT, params, model=str(tiny_model), **ENGINE_ARGS)[0]
    outs = asyncio.run(_stream(engine_process, params, OutputKind.DELTA, pause_after_first=1.0))
    assert len(outs) < 20 and [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    for w in want.outputs:
        mine = [c for o in outs for c in o.outputs if c.index == w.index]
        assert [t for c in mine for t in c.token_ids] == w.token_ids
        assert "".join(c.text for c in mine) == w.text
        assert sum(len(c.logprobs) for c in mine) == len(w.token_ids)
        assert mine[-1].cumulative_logprob == pytest.approx(w.cumulative_logprob, rel=1e-6)
        assert mine[-1].finish_reason == "length"
    assert all(o.prompt_token_ids == want.prompt_token_ids and o.prompt == PROMPT for o in outs)
    assert wait_idle(engine_process)["used_blocks"] == 0


def test_slow_consumer_of_cumulative_outputs_across_the_process(engine_process, tiny_model):
    from tests.serving.test_async_engine import check_slow_cumulative

    check_slow_cumulative(engine_process, tiny_model)


def test_stream_interval_across_the_process(engine_process, tiny_model):
    from tests.serving.test_async_engine import check_stream_interval

    check_stream_interval(engine_process, tiny_model)


def _steps(engine) -> int:
    return engine.timing.steps


def test_stop_string_matched_in_the_client_stops_the_engine(engine_process, tiny_model):
    """The engine process sends token ids only; the client's OutputProcessor detokenizes,
    matches the stop string and has the engine stop the request: the same text, tokens and
    stop reason as offline, and the engine stops within a few steps of the match instead of
    running on to max_tokens (how many depends on how soon the client process gets a CPU).
    Prompt logprobs cross the process too."""
    greedy = jaxengine.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    text = jaxengine.generate(PROMPTS[0], greedy, model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0].text
    assert len(text) > 12
    stop = text[8:11]
    params = jaxengine.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, stop=[stop], prompt_logprobs=1)
    want = jaxengine.generate(PROMPTS[0], params, model=str(tiny_model), **ENGINE_ARGS)[0]
    assert want.outputs[0].finish_reason == "stop" and want.outputs[0].stop_reason == stop
    before = engine_process.call(_steps).result(timeout=10)
    tokens, got_text, outs = asyncio.run(_tokens(engine_process, PROMPTS[0], params))
    stats = wait_idle(engine_process)
    steps = engine_process.call(_steps).result(timeout=10) - before
    assert tokens == want.outputs[0].token_ids and got_text == want.outputs[0].text
    last = outs[-1].outputs[0]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert steps <= len(tokens) + 10 < 100, steps
    assert stats["used_blocks"] == 0 and not stats["unfinished"]
    got_lp, want_lp = outs[-1].prompt_logprobs, want.prompt_logprobs
    assert got_lp[0] is None and len(got_lp) == len(want_lp) == len(want.prompt_token_ids)
    for g, w in zip(got_lp[1:], want_lp[1:]):
        assert g.keys() == w.keys()
        assert [v.logprob for v in g.values()] == pytest.approx([v.logprob for v in w.values()], abs=1e-4)


def test_a_failure_building_outputs_fails_its_request_and_the_client_goes_on(engine_process, want, monkeypatch):
    """Outputs are built on the client's reader thread: should that fail for a step, its
    requests fail with the error (no stream hangs), the engine aborts them, and the client
    keeps serving."""
    from jaxengine.engine.async_engine import EngineDeadError

    real = engine_process.processor.process

    def process(out):
        if any(rid.startswith("doomed") for rid in out.req_ids):
            raise RuntimeError("bug in output building")
        return real(out)

    monkeypatch.setattr(engine_process.processor, "process", process)
    params = jaxengine.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def doomed():
        async for _ in engine_process.generate(PROMPTS[0], params, request_id="doomed-1"):
            pass

    with pytest.raises(EngineDeadError, match="bug in output building"):
        asyncio.run(asyncio.wait_for(doomed(), 60))
    stats = wait_idle(engine_process)
    assert stats["used_blocks"] == 0 and not stats["unfinished"], stats
    tokens, text, _ = asyncio.run(_tokens(engine_process, PROMPTS[0], jaxengine.SamplingParams(max_tokens=24, temperature=0.0)))
    assert tokens == want[0].outputs[0].token_ids and text == want[0].outputs[0].text
    assert len(engine_process.processor) == 0


def test_a_failure_starting_outputs_fails_the_add_and_the_engine_drops_it(engine_process, monkeypatch):
    real = engine_process.processor.add

    def add(rid, *args):
        if rid == "bad-add":
            raise RuntimeError("detokenizer could not start")
        return real(rid, *args)

    monkeypatch.setattr(engine_process.processor, "add", add)

    async def bad():
        async for _ in engine_process.generate(PROMPTS[0], jaxengine.SamplingParams(max_tokens=50, ignore_eos=True),
                                               request_id="bad-add"):
            pass

    with pytest.raises(RuntimeError, match="detokenizer could not start"):
        asyncio.run(asyncio.wait_for(bad(), 60))
    stats = wait_idle(engine_process)
    assert stats["used_blocks"] == 0 and not stats["unfinished"], stats
    assert engine_process.num_unfinished == 0


def _multi_step_runs(engine) -> int:
    return engine.timing.multi_step_runs


def test_multi_step_decode_across_the_process(tiny_model, want):
    """num_scheduler_steps: a step's outputs carry several tokens per request; split per
    client and detokenized there, the streams still equal the offline engine's."""
    from jaxengine import EngineConfig
    from jaxengine.engine.engine_process import EngineProcess

    proc = EngineProcess(EngineConfig.from_kwargs(str(tiny_model), **ENGINE_ARGS, num_scheduler_steps=4), progress=False)
    try:
        params = jaxengine.SamplingParams(max_tokens=24, temperature=0.0)

        async def both():
            return await asyncio.gather(*[_tokens(proc, p, params) for p in PROMPTS])

        for (tokens, text, outs), w in zip(asyncio.run(both()), want):
            assert tokens == w.outputs[0].token_ids and text == w.outputs[0].text
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert proc.call(_multi_step_runs).result(timeout=10) > 0
        assert wait_idle(proc)["used_blocks"] == 0
    finally:
        proc.shutdown()
