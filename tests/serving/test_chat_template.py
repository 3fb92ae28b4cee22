"""Chat requests and chat templates, end to end: README's `jaxengine client --chat` against a
real `jaxengine serve` of the shipped model (whose tokenizer_config.json carries a template);
a model without one answers INVALID_ARGUMENT saying to pass `--chat-template`, over gRPC and
in the CLI; `serve --chat-template FILE` supplies one."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from jaxengine import LLM, SamplingParams
from jaxengine.config import default_model_dir
from jaxengine.engine.tokenizer import apply_chat_template, load_chat_template, load_tokenizer
from models.loading.generation_config import sampling_defaults
from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from tests.serving.conftest import collect, request
from tests.serving.serve_process import ServeProcess
from tests.serving.tiny_model import CHAT_TEMPLATE, ENGINE_ARGS, write_tiny_model

QUESTION = "A function that reverses a string."


def _client(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", "client", *args, "--target", address],
                          capture_output=True, text=True, timeout=120)


def test_client_chat_against_the_shipped_model():
    srv = ServeProcess("--max-model-len", "512", "--num-kv-blocks", "128", engine=False)
    try:
        srv.wait_ready()
        chat = _client(srv.address, QUESTION, "--chat", "--max-tokens", "16", "--temperature", "0")
        plain = _client(srv.address, "def fibonacci(n):", "--max-tokens", "12", "--seed", "5")
    finally:
        srv.close()
    llm = LLM(progress=False, max_model_len=512)
    messages = [{"role": "user", "content": QUESTION}]
    want_chat = llm.chat(messages, SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)[0]
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == want_chat.outputs[0].text + "\n"
    # The template renders the request as a Python comment after the BOS the model was trained on.
    assert llm.tokenizer.decode(want_chat.prompt_token_ids) == "<|endoftext|># " + QUESTION + "\n"
    # `client` without sampling flags gets the model's generation_config.json sampling from the
    # server, as `generate` does (tests/serving/test_cli.py): vLLM's --generation-config auto.
    defaults = sampling_defaults(default_model_dir())
    assert defaults.get("temperature", 1.0) > 0
    sampled = llm.generate("def fibonacci(n):", SamplingParams(max_tokens=12, seed=5, **defaults))[0].outputs[0].text
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == sampled + "\n"


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("no-template"), chat_template=False)
    assert not load_tokenizer(path).chat_template
    return path


@pytest.fixture(scope="module")
def no_template_engine(no_template_model):
    from jaxengine import AsyncEngine, EngineConfig
    from jaxengine.engine.data_parallel import make_engine

    engine = AsyncEngine(make_engine(EngineConfig.from_kwargs(str(no_template_model), **ENGINE_ARGS), progress=False))
    yield engine
    engine.shutdown()


def test_no_chat_template_is_invalid_argument_naming_the_flag(no_template_engine):
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(no_template_engine, ServeOptions(port=0, model_name="tiny"))
    try:
        ch = grpc.insecure_channel(srv.address)
        stub = engine_pb2_grpc.EngineServiceStub(ch)
        chat = request(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(grpc.RpcError) as e:
            collect(stub, chat, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "no chat template" in e.value.details() and "--chat-template FILE" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(pb.TokenizeRequest(chat=chat.chat), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--chat-template" in e.value.details()
        assert not stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).has_chat_template
        # Text still works; and the CLI shows the same hint, in one line, exit code 1.
        _, ok = collect(stub, request("Hello", max_tokens=2), timeout=30)
        assert ok.finish_reason == "length"
        cli = _client(srv.address, "hi", "--chat", "--max-tokens", "4")
        assert cli.returncode == 1 and cli.stdout == ""
        assert cli.stderr.startswith("error: INVALID_ARGUMENT:") and "--chat-template FILE" in cli.stderr, cli.stderr
        assert "Traceback" not in cli.stderr
        ch.close()
    finally:
        srv.close()


def test_serve_chat_template_file(no_template_model, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    srv = ServeProcess("--chat-template", str(template), model=str(no_template_model))
    try:
        srv.wait_ready()
        cli = _client(srv.address, "hi", "--chat", "--max-tokens", "5", "--temperature", "0")
    finally:
        srv.close()
    assert cli.returncode == 0, cli.stderr
    tok = load_tokenizer(no_template_model)
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}], chat_template=CHAT_TEMPLATE)
    want = LLM(str(no_template_model), progress=False, **ENGINE_ARGS).generate(
        ids, SamplingParams(max_tokens=5, temperature=0.0))[0].outputs[0].text
    assert cli.stdout == want + "\n"


def test_load_chat_template_takes_a_file_or_the_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(f)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing.jinja"))
