"""`jaxengine generate` and `jaxengine serve` on a model that cannot be loaded (real files on
disk, real subprocesses): non-zero exit, one `error:` line that names the file (or lists the
presets / supported architectures), no traceback, never "exit code 0". Also the ports: a
metrics port or a gRPC port in use is one line naming it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from models import PRESETS, SUPPORTED_ARCHITECTURES

TIMEOUT = 240


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT)


def _generate(model) -> subprocess.CompletedProcess:
    return _run("generate", "def f():", "--model", str(model), "--max-tokens", "2", "--quiet")


def _serve(model, *extra: str) -> subprocess.CompletedProcess:
    return _run("serve", "--model", str(model), "--port", "0", "--http-port", "0", "--quiet", *extra)


def _error_line(proc: subprocess.CompletedProcess, *words) -> str:
    """The one `error:` line of a failed run, which must hold every one of `words`."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert "exit code 0" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for w in words:
        assert str(w) in errors[0], (w, errors[0])
    return errors[0]


@pytest.fixture
def broken(tiny_model, tmp_path):
    """A copy of the tiny checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model, path)
    return path


def _truncate(path) -> None:
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["generate", "serve-engine-process", "serve-engine-thread"])
def test_truncated_safetensors(broken, how):
    _truncate(broken)
    if how == "generate":
        proc = _generate(broken)
    else:
        proc = _serve(broken, "--engine-process" if how == "serve-engine-process" else "--no-engine-process")
    _error_line(proc, broken / "model.safetensors", "truncated")


def test_safetensors_header_not_json(broken):
    f = broken / "model.safetensors"
    f.write_bytes(b"\x10" + b"\0" * 7 + b"not json at all!" + f.read_bytes()[24:])
    _error_line(_generate(broken), f, "not JSON")


@pytest.mark.parametrize("how", ["generate", "serve"])
def test_config_not_json(broken, how):
    (broken / "config.json").write_text("{ oops")
    proc = _generate(broken) if how == "generate" else _serve(broken)
    _error_line(proc, broken / "config.json", "not valid JSON")


def test_config_missing_field(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["vocab_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    _error_line(_generate(broken), broken / "config.json", "missing required field(s) vocab_size")


def test_unknown_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    _error_line(_generate(broken), broken / "config.json", "FalconForCausalLM", *SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("how", ["generate", "serve"])
def test_unknown_preset_lists_the_presets(how, tmp_path):
    proc = _generate("llama-3.2-1bb") if how == "generate" else _serve("llama-3.2-1bb")
    _error_line(proc, "'llama-3.2-1bb'", "presets:", *PRESETS)


def test_missing_directory(tmp_path):
    _error_line(_serve(tmp_path / "nowhere"), tmp_path / "nowhere", "presets:")


def test_missing_tokenizer_for_text(broken):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (broken / f).unlink(missing_ok=True)
    _error_line(_generate(broken), "no tokenizer files", broken, "--tokenizer")


def test_preset_without_tokenizer_for_text():
    _error_line(_generate("tiny-llama"), "tiny-llama", "no tokenizer", "--tokenizer")


def test_chat_template_file_missing(tiny_model, tmp_path):
    _error_line(_serve(tiny_model, "--chat-template", str(tmp_path / "chat.jinja")), tmp_path / "chat.jinja",
                "does not exist")


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_metrics_port_in_use(tiny_model, busy_port):
    proc = _serve(tiny_model, "--metrics-port", str(busy_port))
    line = _error_line(proc, f"127.0.0.1:{busy_port}", "--metrics-port", "in use")
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert line.count("\n") == 0


def test_grpc_port_in_use(tiny_model, busy_port):
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--port",
                           str(busy_port), "--http-port", "0", "--quiet"], capture_output=True, text=True, timeout=TIMEOUT)
    _error_line(proc, f"127.0.0.1:{busy_port}", "in use")
    assert "Event loop is closed" not in proc.stderr, proc.stderr
