"""`jaxengine serve` as a real process: health NOT_SERVING while it compiles, the ready
line, then SIGTERM with calls in flight (engine on a thread, or in its own process): it exits 0, every call ends with a finish reason
(or UNAVAILABLE), none hangs, and new calls are refused while it drains."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from tests.serving.conftest import request
from tests.serving.tiny_model import ENGINE_ARGS

READY = re.compile(r"serving .* on grpc://127\.0\.0\.1:(\d+)")
LOADING = re.compile(r"health NOT_SERVING on 127\.0\.0\.1:(\d+)")


def _lines(stream, q: queue.Queue, sink: list):
    for line in stream:
        sink.append(line)
        q.put(line)


def _wait_for(q: queue.Queue, pattern: re.Pattern, timeout: float, proc) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = pattern.search(q.get(timeout=0.5))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if m:
            return m
    pytest.fail(f"no line matching {pattern.pattern!r} (exit code {proc.poll()})")


@pytest.fixture(params=[False, True], ids=["engine-thread", "engine-process"])
def serve_process(tiny_model, request):
    args = [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--port", "0", "--http-port", "0",
            "--quiet", "--drain-timeout", "0.3", "--metrics-port", "0"] + (["--engine-process"] if request.param else [])
    for k, v in ENGINE_ARGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_q, err_q, out, err = queue.Queue(), queue.Queue(), [], []
    readers = [threading.Thread(target=_lines, args=(proc.stdout, out_q, out), daemon=True),
               threading.Thread(target=_lines, args=(proc.stderr, err_q, err), daemon=True)]
    for t in readers:
        t.start()
    yield proc, out_q, err_q, out, err
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _run_call(stub, req, results, i):
    last = None
    try:
        for resp in stub.Generate(req, timeout=60):
            last = resp
        results[i] = ("ok", [d.finish_reason for d in last.outputs])
    except grpc.RpcError as e:
        results[i] = (e.code(), e.details())


def test_sigterm_drains_and_exits_zero(serve_process):
    proc, out_q, err_q, out, err = serve_process
    port = int(_wait_for(err_q, LOADING, 120, proc).group(1))
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(ch)
    try:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    except grpc.RpcError:  # the port may open a moment after the line
        time.sleep(0.5)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    ready = out_q.qsize() and any(READY.search(line) for line in out)
    if not ready:  # compile takes seconds: still loading
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert int(_wait_for(out_q, READY, 180, proc).group(1)) == port
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

    stub = engine_pb2_grpc.EngineServiceStub(ch)
    first = list(stub.Generate(request("Hello", max_tokens=4, temperature=0), timeout=60))
    assert first[-1].outputs[-1].finish_reason == pb.FINISH_REASON_LENGTH

    num_calls = 96  # waves of max_num_seqs: the engine process cannot finish them all inside the drain
    results: list = [None] * num_calls
    threads = [threading.Thread(target=_run_call, args=(stub, request([1 + i, 7], max_tokens=150, ignore_eos=True), results, i))
               for i in range(num_calls)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # calls in flight
    proc.send_signal(signal.SIGTERM)
    # New calls are refused while draining (or the port is already closed).
    try:
        list(stub.Generate(request("Hello", max_tokens=2), timeout=10))
        refused = None
    except grpc.RpcError as e:
        refused = e.code()
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert_drained(proc, threads, results, err)
    ch.close()


def assert_drained(proc, threads: list[threading.Thread], results: list, err: list[str]) -> None:
    """The server exits 0; every call ends with a finish reason (some cut off by the drain)
    or UNAVAILABLE; none hangs."""
    assert proc.wait(timeout=90) == 0, "".join(err)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a call hangs after shutdown"
    finish = {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_ABORT}
    for r in results:
        assert r is not None
        assert (r[0] == "ok" and set(r[1]) <= finish) or r[0] == grpc.StatusCode.UNAVAILABLE, r
    assert any(r[0] == "ok" and r[1] == [pb.FINISH_REASON_ABORT] for r in results), results  # the drain cut some off
    assert any("draining" in line for line in err) and any("stopped" in line for line in err), err


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_serve_exits_with_the_error_when_the_model_cannot_load(tmp_path, engine_process):
    # The load runs on a thread (or in the engine process); its error must reach the server, not hang it.
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--model", str(tmp_path), "--port", "0",
                           "--http-port", "0", "--quiet"]
                          + (["--engine-process"] if engine_process else []), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no config.json" in proc.stdout + proc.stderr
