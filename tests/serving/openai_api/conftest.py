"""One `jaxengine serve` of the shipped default model with the HTTP API on and an API key,
shared by every test of this folder that needs it (package scope), and the Python API on
the same model to compare it with. The server boots while the reference LLM compiles."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from tests.serving.serve_process import ServeProcess

API_KEY = "test-key-123"
ORIGIN = "http://app.example"
# Constrained JSON without free whitespace: the default model likes newlines (test_structured_outputs.py).
SERVER_ARGS = ("--max-model-len", "512", "--num-kv-blocks", "128", "--api-key", API_KEY, "--allowed-origins", ORIGIN,
               "--structured-outputs-disable-any-whitespace")


@pytest.fixture(scope="package")
def _booting_server():
    srv = ServeProcess(*SERVER_ARGS, engine=False, http=True)
    yield srv
    srv.close()


@pytest.fixture(scope="package")
def llm(_booting_server):
    from jaxengine import LLM

    return LLM(progress=False, max_model_len=512)


@pytest.fixture(scope="package")
def api_server(_booting_server, llm) -> ServeProcess:
    _booting_server.wait_ready()
    return _booting_server


@pytest.fixture(scope="package")
def client(api_server):
    import openai

    with openai.OpenAI(base_url=api_server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def scrape(http_port: int) -> dict[str, float]:
    """/metrics as {sample name with labels: value} (no key needed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name)] = float(value)
    return out


def wait_idle(http_port: int, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(http_port)
        idle = (m["jaxengine:num_requests_running"] == 0 and m["jaxengine:num_requests_waiting"] == 0
                and m["jaxengine:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)
