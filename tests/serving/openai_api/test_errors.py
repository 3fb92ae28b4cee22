"""Every error of the HTTP API, in OpenAI's shape `{"error": {"message", "type", "param",
"code"}}`, through the `openai` client (which maps the status codes to its exceptions): 400
naming the field, 400 over max_model_len, 404 model, 401 API key, 413 body size; and on a
server of its own (tiny model, one sequence at a time, --max-queue 1) 429 for a full queue,
then 503 and ended streams once its engine process is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2
import openai
import pytest

from tests.serving.openai_api.conftest import API_KEY, ORIGIN, scrape
from tests.serving.serve_process import ENGINE_PID, ServeProcess

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fields,param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(extra_body=dict(logit_bias={"x": 1.0})), "logit_bias"),
    (dict(extra_body=dict(temperature="hot")), "temperature"),  # pydantic's check
    (dict(extra_body=dict(n=True)), "n"),  # strict: a bool is not a number
    (dict(extra_body=dict(top_k=-2)), "top_k"),
    (dict(extra_body=dict(min_tokens=20), max_tokens=5), "min_tokens"),
    (dict(extra_body=dict(suffix="x")), "suffix"),
    (dict(stream_options={"include_usage": True}), "stream_options"),  # without stream
])
def test_bad_field_is_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="x", **fields)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and param in e.value.message, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_chat_fields_are_400(client):
    for kw, param in ((dict(messages=[]), "messages"),
                      (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
                      (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                       "messages[0].content[0].type"),
                      (dict(messages=MESSAGES, top_logprobs=2), "top_logprobs"),
                      (dict(messages=MESSAGES, response_format={"type": "xml"}), "response_format.type"),
                      (dict(messages=MESSAGES, response_format={"type": "json_schema"}), "response_format.json_schema"),
                      (dict(messages=MESSAGES, extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}),
                       "structured_outputs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", **kw)
        assert e.value.body["param"] == param, e.value.body


def test_missing_prompt_and_bad_json(api_server):
    url = f"{api_server.base_url}/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx2.post(url, json={"max_tokens": 3}, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "required" in r.json()["error"]["message"]
    r = httpx2.post(url, content=b"{not json", headers=headers | {"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_over_long_prompt_is_400_naming_max_model_len(client, llm):
    prompt = "x = 1\n" * 400
    assert len(llm.tokenizer.encode(prompt)) > 512
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="max_model_len=512"):
            r = client.completions.create(model="default", prompt=prompt, max_tokens=4, stream=stream)
            list(r)
    with pytest.raises(openai.BadRequestError, match="max_model_len=512"):  # the prompt fits, with max_tokens not
        client.completions.create(model="default", prompt="x = 1\n", max_tokens=600)
    with pytest.raises(openai.BadRequestError, match="max_model_len=512"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}], max_tokens=4)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-4" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)


def test_api_key_is_required_except_for_probes(api_server):
    with openai.OpenAI(base_url=api_server.base_url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model="default", prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    base = f"http://127.0.0.1:{api_server.http_port}"
    r = httpx2.post(f"{base}/tokenize", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    for path in ("/health", "/metrics", "/version"):  # open: probes and scrapers carry no key
        assert httpx2.get(base + path, timeout=30).status_code == 200, path
    assert httpx2.get(f"{base}/version", timeout=30).json()["version"]
    metrics = httpx2.get(f"{base}/metrics", timeout=30).text
    assert "jaxengine:num_requests_running" in metrics and "jaxengine:request_success_total" in metrics


def test_cors_only_for_allowed_origins(api_server):
    url = f"{api_server.base_url}/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx2.options(url, headers=preflight | {"Origin": ORIGIN}, timeout=30)  # no key: browsers send none here
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx2.options(url, headers=preflight | {"Origin": "http://elsewhere.example"}, timeout=30)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx2.get(f"{api_server.base_url}/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"},
                   timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_body_over_the_limit_is_413(api_server):
    r = httpx2.post(f"{api_server.base_url}/completions", content=b"x" * (17 << 20),
                    headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_busy_http_port_fails_start_up_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--port", "0", "--http-port", str(port),
                               "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"127.0.0.1:{port} (--http-port)" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- 429 and 503


# ~1.3 s on 2 CPU cores for the tiny model, several times what the test takes to kill the engine.
LONG = dict(max_tokens=500, extra_body=dict(ignore_eos=True), temperature=0.0)


def test_queue_full_is_429_and_engine_death_is_503(tiny_model):
    srv = ServeProcess("--max-queue", "1", model=str(tiny_model), http=True, max_model_len=512, max_num_seqs=1)
    try:
        srv.wait_ready()
        engine_pid = int(srv.wait_for(ENGINE_PID).group(1))
        c = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)
        # A runs (the only sequence allowed); B waits for it, filling the queue of 1; C is refused.
        running = c.completions.create(model=str(tiny_model), prompt=[1, 2, 3], stream=True, **LONG)
        next(iter(running))
        waiting: list = []
        b = threading.Thread(target=_complete, args=(c, str(tiny_model), waiting))
        b.start()
        deadline = time.monotonic() + 30
        while scrape(srv.http_port)["jaxengine:num_requests_waiting"] < 1:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=str(tiny_model), prompt=[4, 5], max_tokens=2)
        assert e.value.status_code == 429 and "--max-queue is 1" in e.value.message

        assert httpx2.get(f"http://127.0.0.1:{srv.http_port}/health", timeout=10).status_code == 200
        health = _HealthPoller(srv.http_port)
        os.kill(engine_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError) as e:  # the stream that was running ends with an error event
            for _ in running:
                pass
        assert "engine process" in e.value.message and "killed by signal 9" in e.value.message, e.value.message
        b.join(30)
        assert isinstance(waiting[0], openai.InternalServerError) and waiting[0].status_code == 503, waiting
        with pytest.raises(openai.InternalServerError) as e:  # new requests, while the server lingers
            c.completions.create(model=str(tiny_model), prompt=[4, 5], max_tokens=2)
        assert e.value.status_code == 503
        assert srv.proc.wait(timeout=60) != 0
        seen = health.stop()
        assert 503 in seen, seen  # 503 while the port was still open, before it closed
        assert "Traceback" not in srv.log, srv.log
    finally:
        srv.close()


def _complete(c: openai.OpenAI, model: str, out: list) -> None:
    try:
        out.append(c.completions.create(model=model, prompt=[7, 8, 9], max_tokens=4))
    except openai.APIError as e:
        out.append(e)


class _HealthPoller:
    """GET /health every 20 ms on a thread; `seen`: the status codes, then "down" once refused."""

    def __init__(self, port: int):
        self.seen: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(f"http://127.0.0.1:{port}/health",), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(httpx2.get(url, timeout=2).status_code)
            except httpx2.HTTPError:
                self.seen.append("down")
                return
            time.sleep(0.02)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(10)
        return self.seen
