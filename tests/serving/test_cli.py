"""`jaxengine generate` as a user runs it: a real process on the shipped model."""

import subprocess
import sys

from jaxengine import LLM, SamplingParams


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_prints_prompt_and_greedy_continuation():
    proc = _run("generate", "def fibonacci(n):", "--max-tokens", "12", "--temperature", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    want = LLM(progress=False).generate("def fibonacci(n):", SamplingParams(max_tokens=12, temperature=0))[0]
    assert proc.stdout == "def fibonacci(n):" + want.outputs[0].text + "\n"


def test_generate_rejects_bad_sampling_parameter():
    proc = _run("generate", "x", "--temperature", "-1", "--quiet")
    assert proc.returncode == 2
    assert "temperature must be" in proc.stderr
