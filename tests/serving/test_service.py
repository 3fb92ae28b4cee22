"""A real server on a free localhost port, talked to through the generated stubs: outputs
match the offline engine, n > 1, chat, logprobs, stop strings, health, reflection,
tokenize / detokenize, model info, metrics, queue limit and failure isolation."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import jaxengine
from serving.generated import engine_pb2 as pb
from serving.servicer import SERVICE_NAME
from tests.serving.conftest import collect, request, wait_idle
from tests.serving.tiny_model import ENGINE_ARGS

PROMPTS = ["def fibonacci(n):", "Hello world", "import numpy as np\nx = "]


@pytest.fixture(scope="module")
def offline(tiny_model):
    """The offline engine's greedy outputs, as `jaxengine.generate` returns them."""
    params = jaxengine.SamplingParams(max_tokens=24, temperature=0.0)
    outs = jaxengine.generate(PROMPTS, params, model=str(tiny_model), **ENGINE_ARGS)
    chat = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "fibonacci please"}]
    llm = jaxengine.entrypoints.llm._cached_llm(str(tiny_model), tuple(sorted(ENGINE_ARGS.items())))
    chat_out = llm.chat(chat, params, use_tqdm=False)[0]
    stop_out = llm.generate(PROMPTS[0], jaxengine.SamplingParams(max_tokens=24, temperature=0.0, logprobs=3), use_tqdm=False)[0]
    return dict(outs=outs, chat=chat, chat_out=chat_out, logprobs_out=stop_out)


def test_streamed_greedy_matches_offline_generate(stub, offline):
    for prompt, want in zip(PROMPTS, offline["outs"]):
        resps, got = collect(stub, request(prompt, max_tokens=24, temperature=0.0))
        assert got.token_ids == want.outputs[0].token_ids
        assert got.text == want.outputs[0].text
        assert got.finish_reason == want.outputs[0].finish_reason
        assert len(resps) > 2  # streamed step by step, not in one message
        assert [r.finished for r in resps] == [False] * (len(resps) - 1) + [True]
        last = resps[-1]
        assert last.usage.prompt_tokens == len(want.prompt_token_ids)
        assert last.usage.completion_tokens == len(got.token_ids)
        assert 0 < last.timings.ttft_s <= last.timings.e2e_s
        assert 0 <= last.timings.queue_time_s <= last.timings.ttft_s


def test_token_id_input_matches_text_input(stub, offline):
    want = offline["outs"][1]
    _, got = collect(stub, request(list(want.prompt_token_ids), max_tokens=24, temperature=0.0))
    assert got.token_ids == want.outputs[0].token_ids


def test_n_samples(stub):
    _, got = collect(stub, request("Hello", n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True))
    assert [c.index for c in got.completions] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in got.completions)
    assert len({tuple(c.token_ids) for c in got.completions}) > 1
    _, again = collect(stub, request("Hello", n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True))
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in got.completions]


def test_chat_input(stub, offline):
    want = offline["chat_out"]
    resps, got = collect(stub, request(messages=offline["chat"], max_tokens=24, temperature=0.0))
    assert got.token_ids == want.outputs[0].token_ids
    assert resps[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_logprobs(stub, offline):
    want = offline["logprobs_out"].outputs[0]
    _, got = collect(stub, request(PROMPTS[0], max_tokens=24, temperature=0.0, logprobs=3))
    c = got.completions[0]
    assert c.token_ids == want.token_ids and len(c.logprobs) == len(c.token_ids)
    for tok, pos, ref in zip(c.token_ids, c.logprobs, want.logprobs):
        assert pos.sampled.token_id == tok
        assert pos.sampled.logprob == pytest.approx(ref[tok].logprob, abs=1e-5)
        assert len(pos.top) == 3 and [t.rank for t in pos.top] == [1, 2, 3]
        assert pos.top[0].token_id == tok  # greedy: the sampled token is the most likely
        assert all(a.logprob >= b.logprob for a, b in zip(pos.top, pos.top[1:]))
    assert c.cumulative_logprob == pytest.approx(sum(p.sampled.logprob for p in c.logprobs), abs=1e-4)


def test_stop_string_and_stop_token(stub, offline):
    want = offline["outs"][0].outputs[0]
    starts = [i for i in range(2, len(want.text) - 1) if want.text[i:i + 2].isascii() and want.text[i:i + 2].isalnum()]
    assert starts, want.text
    stop = want.text[starts[0]:starts[0] + 2]
    _, got = collect(stub, request(PROMPTS[0], max_tokens=24, temperature=0.0, stop=[stop]))
    assert got.finish_reason == "stop" and got.completions[0].stop_reason == stop
    assert stop not in got.text and want.text.startswith(got.text)
    tok = want.token_ids[4]
    _, got = collect(stub, request(PROMPTS[0], max_tokens=24, temperature=0.0, stop_token_ids=[tok]))
    assert got.finish_reason == "stop" and got.completions[0].stop_reason == tok
    assert got.token_ids == want.token_ids[: want.token_ids.index(tok) + 1]


def test_tokenize_detokenize_round_trip(stub, offline):
    text = "def fibonacci(n):\n    return n"
    tok = stub.Tokenize(pb.TokenizeRequest(text=text))
    assert tok.count == len(tok.token_ids) > 0 and tok.max_model_len == ENGINE_ARGS["max_model_len"]
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=tok.token_ids)).text == text
    chat = stub.Tokenize(pb.TokenizeRequest(chat=request(messages=offline["chat"]).chat))
    assert list(chat.token_ids) == list(offline["chat_out"].prompt_token_ids)
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 100000]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "100000" in e.value.details()


def test_model_info(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model == "tiny" and info.architecture == "LlamaForCausalLM"
    assert info.max_model_len == ENGINE_ARGS["max_model_len"] and info.vocab_size == 512
    assert info.dtype == "float32" and info.tensor_parallel_size == 1
    assert info.has_tokenizer and info.has_chat_template and info.num_kv_blocks == ENGINE_ARGS["num_kv_blocks"]


def test_reflection_lists_the_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    desc = db.FindFileContainingSymbol(SERVICE_NAME)
    assert desc.name == "jaxengine/v1/engine.proto" and desc.package == "jaxengine.v1"


def test_health_states(async_engine):
    """NOT_SERVING while loading, SERVING when ready, NOT_SERVING while draining."""
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(None, ServeOptions(port=0))
    with grpc.insecure_channel(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = pb_stub(ch)

        def status(service=""):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status() == status(SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            collect(stub, request("hi", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
        srv.set_engine(async_engine)
        assert status() == status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        # Drain with one long call in flight: health flips while the call is still running.
        call = stub.Generate(request("hi", max_tokens=150, ignore_eos=True, temperature=0))
        next(call)
        closer = threading.Thread(target=srv.close, kwargs=dict(drain_timeout=30))
        closer.start()
        deadline = time.monotonic() + 10
        while status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            collect(stub, request("hi", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        last = list(call)[-1]  # the in-flight call finishes normally during the drain
        assert last.finished and last.outputs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        closer.join(30)
        assert not closer.is_alive()
    wait_idle(async_engine)


def pb_stub(ch):
    from serving.generated import engine_pb2_grpc

    return engine_pb2_grpc.EngineServiceStub(ch)


def test_metrics_endpoint(server, stub):
    collect(stub, request("Hello", max_tokens=4, temperature=0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("jaxengine:num_requests_running", "jaxengine:num_requests_waiting", "jaxengine:kv_cache_usage_perc",
                 "jaxengine:prefix_cache_queries_total", "jaxengine:prefix_cache_hits_total",
                 "jaxengine:num_preemptions_total", "jaxengine:prompt_tokens_total", "jaxengine:generation_tokens_total",
                 'jaxengine:request_success_total{finished_reason="length"',
                 "jaxengine:time_to_first_token_seconds_bucket", "jaxengine:inter_token_latency_seconds_bucket",
                 "jaxengine:e2e_request_latency_seconds_bucket", "jaxengine:request_queue_time_seconds_bucket"):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("jaxengine:generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 4


def test_max_queue_resource_exhausted(async_engine):
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(async_engine, ServeOptions(port=0, max_queue=2))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_stub(ch)
            hold = async_engine.call(lambda e: time.sleep(1.5))  # the engine thread is busy: nothing starts
            calls = [stub.Generate(request("Hello", max_tokens=3, temperature=0)) for _ in range(2)]
            time.sleep(0.5)  # both accepted and waiting
            with pytest.raises(grpc.RpcError) as e:
                collect(stub, request("Hello", max_tokens=3))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue is 2" in e.value.details()
            hold.result(10)
            assert all(list(c)[-1].finished for c in calls)  # the queued ones still complete
            _, ok = collect(stub, request("Hello", max_tokens=3, temperature=0))
            assert ok.finish_reason == "length"
    finally:
        srv.close()


def test_failure_of_one_call_is_internal_and_others_run(server, stub, async_engine, monkeypatch):
    servicer = server.server.servicer
    real = servicer._response

    def flaky(out, finished, num_tokens):
        if out.request_id == "boom" and num_tokens >= 2:
            raise RuntimeError("injected failure")
        return real(out, finished, num_tokens)

    monkeypatch.setattr(servicer, "_response", flaky)
    other = stub.Generate(request("Hello", max_tokens=30, temperature=0, ignore_eos=True, request_id="fine"))
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request("Hello", max_tokens=30, temperature=0, ignore_eos=True, request_id="boom"))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "injected failure" in e.value.details()
    resps = list(other)
    assert resps[-1].finished and sum(len(d.token_ids) for r in resps for d in r.outputs) == 30
    stats = wait_idle(async_engine)
    assert stats["num_running"] == 0 and stats["used_blocks"] == 0


def test_engine_step_failure_fails_calls_in_flight_then_recovers(stub, async_engine, monkeypatch):
    engine = async_engine.engine
    real = engine.step_records
    state = {"failed": False}

    def step():
        if not state["failed"] and "doomed" in engine.requests:
            state["failed"] = True
            raise RuntimeError("device fell over")
        return real()

    monkeypatch.setattr(engine, "step_records", step)
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request("Hello", max_tokens=5, request_id="doomed"))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "device fell over" in e.value.details()
    _, ok = collect(stub, request("Hello", max_tokens=5, temperature=0))
    assert ok.finish_reason == "length"
    assert wait_idle(async_engine)["used_blocks"] == 0


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancel_or_deadline_aborts_and_frees_blocks(stub, async_engine, how, monkeypatch):
    wait_idle(async_engine)
    real_step = async_engine.engine.step_records

    def slow_step():  # 120 tokens now take > 2.4 s: the call is surely cut off mid-generation
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(async_engine.engine, "step_records", slow_step)
    req = request(list(range(1, 40)), max_tokens=120, ignore_eos=True, request_id=f"cut-{how}")
    if how == "cancel":
        call = stub.Generate(req, timeout=60)
        next(call)
        next(call)
        assert async_engine.call(lambda e: e.stats()["kv_cache_usage"]).result() > 0
        call.cancel()
        code = call.code()
    else:
        with pytest.raises(grpc.RpcError) as e:
            collect(stub, req, timeout=0.3)
        code = e.value.code()
    assert code == (grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED)
    t0 = time.monotonic()
    stats = wait_idle(async_engine, timeout=5)
    assert stats["used_blocks"] == 0 and stats["num_running"] == 0 and not stats["unfinished"], stats
    assert time.monotonic() - t0 < 1.0  # aborted within a step or so, not after generating 120 tokens


def test_duplicate_request_id_in_flight(stub, async_engine):
    first = stub.Generate(request("Hello", max_tokens=40, ignore_eos=True, request_id="same"))
    next(first)
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request("Hello", max_tokens=2, request_id="same"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert list(first)[-1].finished


def test_cli_client(server, stub, offline):
    want = offline["outs"][0].outputs[0].text
    cmd = [sys.executable, "-m", "serving.cli", "client", PROMPTS[0], "--target", server.address, "--max-tokens", "24",
           "--temperature", "0"]
    out = subprocess.run(cmd + ["--stream"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    out = subprocess.run(cmd + ["--chat"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _, chat = collect(stub, request(messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24, temperature=0))
    assert out.stdout == chat.text + "\n"
