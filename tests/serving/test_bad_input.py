"""Every kind of invalid field gets INVALID_ARGUMENT with a message naming the field (and
the limit), the server keeps serving, and a hypothesis fuzz of GenerateRequest finds no
crash (INTERNAL / UNKNOWN) and no hang (DEADLINE_EXCEEDED)."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serving.generated import engine_pb2 as pb
from tests.serving.conftest import collect, request, wait_idle

VOCAB, MAX_LEN = 512, 160
NAN, INF = math.nan, math.inf

# (case id, request, words the error message must contain)
BAD = [
    ("temperature-negative", request("hi", temperature=-1.0), ["temperature", ">= 0"]),
    ("temperature-nan", request("hi", temperature=NAN), ["temperature", "finite"]),
    ("temperature-inf", request("hi", temperature=INF), ["temperature", "finite"]),
    ("top_p-zero", request("hi", top_p=0.0), ["top_p", "> 0", "<= 1"]),
    ("top_p-above-one", request("hi", top_p=1.5), ["top_p", "<= 1"]),
    ("top_p-nan", request("hi", top_p=NAN), ["top_p"]),
    ("top_k-below-minus-one", request("hi", top_k=-2), ["top_k", "-1"]),
    ("min_p-above-one", request("hi", min_p=1.5), ["min_p", "<= 1"]),
    ("presence_penalty", request("hi", presence_penalty=2.5), ["presence_penalty", "<= 2"]),
    ("frequency_penalty", request("hi", frequency_penalty=-3.0), ["frequency_penalty", ">= -2"]),
    ("repetition_penalty", request("hi", repetition_penalty=0.0), ["repetition_penalty", "> 0"]),
    ("n-zero", request("hi", n=0), ["n must be", ">= 1"]),
    ("max_tokens-zero", request("hi", max_tokens=0), ["max_tokens", ">= 1"]),
    ("max_tokens-negative", request("hi", max_tokens=-5), ["max_tokens", ">= 1"]),
    ("max_tokens-beyond-model", request("hi", max_tokens=MAX_LEN), ["max_tokens", f"max_model_len={MAX_LEN}"]),
    ("min_tokens-above-max", request("hi", max_tokens=4, min_tokens=5), ["min_tokens", "max_tokens"]),
    ("min_tokens-negative", request("hi", min_tokens=-1), ["min_tokens", ">= 0"]),
    ("logprobs-too-many", request("hi", logprobs=21), ["logprobs", "20"]),
    ("logprobs-negative", request("hi", logprobs=-1), ["logprobs"]),
    ("stop-huge-list", request("hi", stop=[f"s{i}" for i in range(10_000)]), ["stop", "at most 16"]),
    ("stop-empty-string", request("hi", stop=[""]), ["stop", "non-empty"]),
    ("stop_token_ids-negative", request("hi", stop_token_ids=[-1]), ["stop_token_ids", ">= 0"]),
    ("stop_token_ids-too-many", request("hi", stop_token_ids=list(range(65))), ["stop_token_ids", "64"]),
    ("logit_bias-token-beyond-vocab", request("hi", logit_bias={VOCAB: 1.0}), ["logit_bias", f"[0, {VOCAB})"]),
    ("logit_bias-negative-token", request("hi", logit_bias={-3: 1.0}), ["logit_bias", ">= 0"]),
    ("logit_bias-value", request("hi", logit_bias={5: 1000.0}), ["logit_bias[5]", "[-100, 100]"]),
    ("logit_bias-too-many", request("hi", logit_bias={i: 0.5 for i in range(301)}), ["logit_bias", "300"]),
    ("no-input", pb.GenerateRequest(), ["no input", "text, token_ids or chat"]),
    ("empty-text", request(""), ["text must not be empty"]),
    ("empty-token-ids", pb.GenerateRequest(token_ids=pb.TokenIds()), ["token_ids", "empty"]),
    ("token-id-beyond-vocab", request([1, 2, VOCAB]), ["token ids", f"[0, {VOCAB})"]),
    ("token-id-negative", request([1, -7]), ["token ids", "-7"]),
    ("prompt-too-long", request([1] * MAX_LEN, max_tokens=1), ["max_model_len", str(MAX_LEN)]),
    ("text-prompt-too-long", request("hello " * 400, max_tokens=1), ["max_model_len", str(MAX_LEN)]),
    ("messages-empty", pb.GenerateRequest(chat=pb.ChatMessages()), ["chat.messages", "empty"]),
    ("messages-bad-role", request(messages=[{"role": "wizard", "content": "hi"}]), ["role", "user"]),
    ("messages-missing-role", request(messages=[{"role": "", "content": "hi"}]), ["role"]),
    ("request_id-too-long", request("hi", request_id="x" * 1000), ["request_id", "256"]),
    ("request_id-unprintable", request("hi", request_id="a\nb"), ["request_id", "printable"]),
]


@pytest.mark.parametrize("req,words", [(r, w) for _, r, w in BAD], ids=[c for c, _, _ in BAD])
def test_invalid_field_is_invalid_argument(stub, req, words):
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())


def _python_api_error(engine, prompt) -> str | None:  # runs on the engine thread
    from jaxengine import SamplingParams

    try:
        engine.add_request(prompt, SamplingParams(max_tokens=2), request_id="python-api-empty")
    except ValueError as e:
        return str(e)
    engine.abort_request("python-api-empty")
    return None


@pytest.mark.parametrize("req,prompt", [(request(""), ""), (pb.GenerateRequest(token_ids=pb.TokenIds()), [])],
                         ids=["text", "token-ids"])
def test_empty_prompt_rejected_over_grpc_as_in_the_python_api(stub, async_engine, req, prompt):
    """One rule for an empty prompt: ValueError from the Python API, INVALID_ARGUMENT over gRPC."""
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in e.value.details()
    python = async_engine.call(_python_api_error, prompt).result(timeout=30)
    assert python is not None and "empty" in python


def test_n_above_max_n_is_invalid_argument(stub, async_engine):
    max_n = async_engine.engine.config.max_n
    with pytest.raises(grpc.RpcError) as e:
        collect(stub, request("hi", n=max_n + 1, max_tokens=1), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "max_n" in e.value.details() and str(max_n) in e.value.details(), e.value.details()
    # At the cap it runs.
    _, ok = collect(stub, request("hi", n=max_n, max_tokens=1, ignore_eos=True), timeout=120)
    assert len(ok.completions) == max_n and all(c.finish_reason == "length" for c in ok.completions)
    assert wait_idle(async_engine)["used_blocks"] == 0


def test_server_keeps_serving_after_bad_input(stub, async_engine):
    for _, req, _ in BAD[:5]:
        with pytest.raises(grpc.RpcError):
            collect(stub, req, timeout=30)
    _, ok = collect(stub, request("Hello", max_tokens=4, temperature=0), timeout=30)
    assert ok.finish_reason == "length" and len(ok.token_ids) == 4
    stats = wait_idle(async_engine)
    assert stats["num_running"] == stats["num_waiting"] == stats["used_blocks"] == 0


def test_tokenize_bad_input(stub):
    for req in (pb.TokenizeRequest(), pb.TokenizeRequest(chat=pb.ChatMessages())):
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_garbage_bytes_do_not_hurt_the_server(channel, stub):
    raw = channel.unary_stream("/jaxengine.v1.EngineService/Generate", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        list(raw(b"\xff\xff\xff\x0f\x12garbage", timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not parse" in e.value.details()
    _, ok = collect(stub, request("Hello", max_tokens=2), timeout=30)
    assert ok.finish_reason == "length"


# ---------------------------------------------------------------------------- fuzz

wild_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3), st.sampled_from([0.0, 1.0, 1e-6]))
wild_token = st.integers(-3, VOCAB + 3)
good_token = st.integers(0, VOCAB - 1)
ROLES = ["system", "user", "assistant", "tool"]


@st.composite
def generate_requests(draw):
    """Half the examples anything goes (mostly invalid), half stay in the valid ranges (so
    the engine really runs odd but legal combinations: n, seeds, penalties, logprobs, ...)."""
    wild = draw(st.booleans())
    token = wild_token if wild else good_token
    req = pb.GenerateRequest(request_id=draw(st.sampled_from(["", "fuzz", "x" * 300, "a\tb"] if wild else ["", "fuzz"])),
                             priority=draw(st.integers(-(2**31), 2**31 - 1)))
    kind = draw(st.sampled_from(["text", "token_ids", "chat", None] if wild else ["text", "token_ids", "chat"]))
    if kind == "text":
        req.text = draw(st.text(min_size=0 if wild else 1, max_size=60))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(token, min_size=0 if wild else 1, max_size=MAX_LEN + 10 if wild else 60)))
    elif kind == "chat":
        roles = st.sampled_from(ROLES + ["", "bogus"]) if wild else st.sampled_from(ROLES)
        msgs = draw(st.lists(st.tuples(roles, st.text(max_size=30)), min_size=0 if wild else 1, max_size=4))
        req.chat.SetInParent()
        req.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in msgs)
    sp = req.sampling_params
    floats = {name: wild_floats for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")}
    ints = dict(n=st.integers(-1, 3), top_k=st.integers(-3, VOCAB + 5), seed=st.integers(-(2**63), 2**63 - 1),
                max_tokens=st.one_of(st.integers(-2, 12), st.just(MAX_LEN)), logprobs=st.integers(-2, 22), min_tokens=st.integers(-2, 14))
    if not wild:
        floats.update(temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), min_p=st.floats(0, 1),
                      presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2), repetition_penalty=st.floats(0.1, 2))
        ints.update(n=st.integers(1, 3), top_k=st.integers(-1, VOCAB + 5), max_tokens=st.integers(1, 12),
                    logprobs=st.integers(0, 20), min_tokens=st.integers(0, 1))
    for name, strategy in (floats | ints).items():
        if draw(st.booleans()):
            setattr(sp, name, draw(strategy))
    if not sp.HasField("max_tokens"):
        sp.max_tokens = 8  # keep examples quick (the default, 16, is exercised elsewhere)
    sp.stop.extend(draw(st.lists(st.text(min_size=0 if wild else 1, max_size=4), max_size=18 if wild else 3)))
    sp.stop_token_ids.extend(draw(st.lists(token, max_size=3)))
    sp.ignore_eos = draw(st.booleans())
    sp.include_stop_str_in_output = draw(st.booleans())
    if draw(st.booleans()):
        sp.skip_special_tokens = draw(st.booleans())
    for k, v in draw(st.dictionaries(token, wild_floats if wild else st.floats(-100, 100), max_size=3)).items():
        sp.logit_bias[k] = v
    return req


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(req=generate_requests())
def test_fuzz_generate_request(stub, req):
    try:
        _, result = collect(stub, req, timeout=60)
    except grpc.RpcError as e:
        event(e.code().name)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details()
    else:
        event("OK")
        assert result.completions and all(c.finish_reason in ("stop", "length") for c in result.completions)


def test_engine_idle_after_fuzz(async_engine):
    stats = wait_idle(async_engine)
    assert stats["num_running"] == stats["num_waiting"] == stats["used_blocks"] == 0
