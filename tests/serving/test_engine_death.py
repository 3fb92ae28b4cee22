"""A real `jaxengine serve` whose engine child (or one of its front-end processes) is killed
with SIGKILL mid-stream: health turns NOT_SERVING while the port is still open, the calls in
flight end UNAVAILABLE (not INTERNAL), /metrics still answers, and the server exits non-zero
within 60 s with a log line naming what died, its pid and the signal."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from serving.generated import engine_pb2_grpc
from tests.serving.conftest import request
from tests.serving.serve_process import ENGINE_PID, FRONTEND_PIDS, METRICS, HealthPoller, ServeProcess

LONG = dict(max_tokens=500, ignore_eos=True, temperature=0.0)  # far longer than the test takes to kill
EXIT_WITHIN = 60.0


def _stream(address: str, first: threading.Event, result: list, i: int = 0) -> None:
    """One streaming call on a connection of its own; `result[i]` gets how it ended."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = engine_pb2_grpc.EngineServiceStub(ch)
        received = 0
        try:
            for _ in stub.Generate(request([1 + i, 7, 9], **LONG), timeout=120):
                received += 1
                first.set()
            result[i] = ("finished", received)
        except grpc.RpcError as e:
            result[i] = (e.code(), e.details())
        first.set()


@pytest.fixture
def served(tiny_model):
    procs = []

    def start(*args: str) -> ServeProcess:
        p = ServeProcess("--metrics-port", "0", *args, model=str(tiny_model), max_model_len=512)
        procs.append(p)
        p.wait_ready()
        return p

    yield start
    for p in procs:
        p.close()


def test_engine_killed_mid_stream(served):
    srv = served()
    engine_pid = int(srv.wait_for(ENGINE_PID).group(1))
    metrics_port = int(srv.wait_for(METRICS).group(1))
    first, result = threading.Event(), [None]
    call = threading.Thread(target=_stream, args=(srv.address, first, result))
    call.start()
    assert first.wait(60), "the stream never started"
    health = HealthPoller(srv.address)
    time.sleep(0.1)
    os.kill(engine_pid, signal.SIGKILL)
    killed = time.monotonic()

    call.join(30)
    assert result[0] is not None and result[0][0] == grpc.StatusCode.UNAVAILABLE, result
    assert "the engine process" in result[0][1] and "killed by signal 9" in result[0][1], result
    # The server lingers with health NOT_SERVING: a scrape now must not fail with the engine gone.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and "jaxengine:generation_tokens_total" in resp.read().decode()

    code = srv.proc.wait(timeout=EXIT_WITHIN)
    assert time.monotonic() - killed < EXIT_WITHIN
    seen = health.stop()
    assert code != 0, srv.log
    after = [s for s in seen if s != "SERVING"]
    assert after and after[0] == "NOT_SERVING", seen  # before the port closed (UNAVAILABLE)
    assert f"the engine process (pid {engine_pid}) was killed by signal 9 (SIGKILL)" in srv.log, srv.log
    assert "Traceback" not in srv.log, srv.log


def test_front_end_killed(served):
    srv = served("--api-server-count", "2")
    engine_pid = int(srv.wait_for(ENGINE_PID).group(1))
    (frontend_pid,) = map(int, srv.wait_for(FRONTEND_PIDS).group(1).split(","))
    num_calls = 6  # on connections of their own: the kernel spreads them over both listeners
    started = [threading.Event() for _ in range(num_calls)]
    results: list = [None] * num_calls
    calls = [threading.Thread(target=_stream, args=(srv.address, started[i], results, i)) for i in range(num_calls)]
    for t in calls:
        t.start()
    assert all(e.wait(60) for e in started), results
    os.kill(frontend_pid, signal.SIGKILL)
    killed = time.monotonic()

    for t in calls:
        t.join(30)
    # The killed front-end's calls lose their connection, the others are failed: all UNAVAILABLE.
    assert all(r is not None and r[0] == grpc.StatusCode.UNAVAILABLE for r in results), results
    code = srv.proc.wait(timeout=EXIT_WITHIN)
    assert time.monotonic() - killed < EXIT_WITHIN
    assert code != 0, srv.log
    assert f"front-end process 1 (pid {frontend_pid}) was killed by signal 9 (SIGKILL)" in srv.log, srv.log
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the engine child went with the server
        os.kill(engine_pid, 0)
