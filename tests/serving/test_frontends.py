"""Several front-end processes over one engine process (`jaxengine serve --api-server-count`):
calls on many connections spread over the front-ends and all equal offline greedy output;
/metrics sums every front-end's requests; SIGTERM drains them all and exits 0. Below the
server: an engine child serving two connections aborts the requests of one that leaves and
keeps serving the other; metric families from several processes merge by summing."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

import jaxengine
from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from serving.metrics import _families, merge_families
from tests.serving.conftest import request, wait_idle
from tests.serving.test_shutdown import _lines, _run_call, _wait_for, assert_drained
from tests.serving.tiny_model import ENGINE_ARGS

READY = re.compile(r"serving .* on grpc://127\.0\.0\.1:(\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics, "
                   r"3 front-end processes")
PROMPT = "def fibonacci(n):"


def _greedy_call(port: int, out: list) -> None:
    # A channel of its own (not shared through the global subchannel pool): its own connection,
    # which the kernel hands to one of the listening front-ends.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        resps = list(engine_pb2_grpc.EngineServiceStub(ch).Generate(request(PROMPT, max_tokens=12, temperature=0),
                                                                    timeout=60))
    out.append((resps[0].request_id, [t for r in resps for d in r.outputs for t in d.token_ids],
                resps[-1].outputs[-1].finish_reason))


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_three_front_ends_share_the_port_and_drain(tiny_model):
    want = jaxengine.generate([PROMPT], jaxengine.SamplingParams(max_tokens=12, temperature=0.0),
                              model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0].token_ids
    args = [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model), "--port", "0", "--http-port", "0",
            "--quiet", "--drain-timeout", "0.3", "--metrics-port", "0", "--api-server-count", "3"]
    for k, v in ENGINE_ARGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_q, err_q, out, err = queue.Queue(), queue.Queue(), [], []
    for stream, q, sink in ((proc.stdout, out_q, out), (proc.stderr, err_q, err)):
        threading.Thread(target=_lines, args=(stream, q, sink), daemon=True).start()
    try:
        port, metrics_port = map(int, _wait_for(out_q, READY, 180, proc).groups())

        results: list = []
        threads = [threading.Thread(target=_greedy_call, args=(port, results)) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert len(results) == 24
        assert all(tokens == want and reason == pb.FINISH_REASON_LENGTH for _, tokens, reason in results), results
        pids = {rid.split("-")[1] for rid, _, _ in results}  # the servicer's ids carry its process id
        assert len(pids) >= 2, f"24 connections all reached one front-end: {pids}"

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        assert _metric(text, 'jaxengine:request_success_total{finished_reason="length"') == 24
        assert _metric(text, "jaxengine:generation_tokens_total") == 24 * 12
        assert _metric(text, "jaxengine:e2e_request_latency_seconds_count") == 24
        assert _metric(text, "jaxengine:num_requests_running") == 0

        # SIGTERM with calls in flight on every front-end: all end, the server exits 0.
        num_calls = 48
        calls: list = [None] * num_calls
        threads = []
        for i in range(num_calls):
            ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = engine_pb2_grpc.EngineServiceStub(ch)
            threads.append(threading.Thread(target=_run_call, args=(stub, request([1 + i, 7], max_tokens=150,
                                                                                    ignore_eos=True), calls, i)))
        for t in threads:
            t.start()
        time.sleep(0.5)  # calls in flight
        proc.send_signal(signal.SIGTERM)
        assert_drained(proc, threads, calls, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_engine_aborts_the_requests_of_a_client_that_leaves(tiny_model):
    from jaxengine import EngineConfig
    from jaxengine.engine.engine_process import EngineClient, EngineProcess

    proc = EngineProcess(EngineConfig.from_kwargs(str(tiny_model), **ENGINE_ARGS), progress=False, num_clients=2)
    try:
        other = EngineClient(proc.client_connections[0])
        long = jaxengine.SamplingParams(max_tokens=140, temperature=0.0, ignore_eos=True)
        short = jaxengine.SamplingParams(max_tokens=12, temperature=0.0)

        async def run():
            first = other.generate(PROMPT, long)
            await first.__anext__()  # running in the engine
            stats = await asyncio.wrap_future(proc.call(_stats))
            assert stats["num_running"] == 1
            await asyncio.to_thread(other.shutdown)  # leaves with its request unfinished
            outs = [o async for o in proc.generate(PROMPT, short)]
            await first.aclose()
            return [t for o in outs for t in o.outputs[0].token_ids]

        tokens = asyncio.run(run())
        want = jaxengine.generate([PROMPT], short, model=str(tiny_model), **ENGINE_ARGS)[0].outputs[0].token_ids
        assert tokens == want
        stats = wait_idle(proc)
        assert stats["num_running"] == 0 and stats["used_blocks"] == 0 and not stats["unfinished"]
        assert other._dead or not other._reader.is_alive()
    finally:
        proc.shutdown()
    assert not proc._process.is_alive()


def _stats(engine) -> dict:
    return engine.stats()


def test_metric_families_of_several_processes_sum():
    regs = [CollectorRegistry() for _ in range(3)]
    for i, reg in enumerate(regs):
        c = Counter("x:requests", "doc", ["reason"], registry=reg)
        c.labels("stop").inc(i + 1)
        h = Histogram("x:latency_seconds", "doc", buckets=(0.1, 1.0), registry=reg)
        h.observe(0.05 * (i + 1))
    text = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in merge_families([_families(r) for r in regs]) for s in m.samples}
    assert text[("x:requests_total", (("reason", "stop"),))] == 1 + 2 + 3
    assert text[("x:latency_seconds_count", ())] == 3
    assert text[("x:latency_seconds_bucket", (("le", "0.1"),))] == 2  # 0.05, 0.10 <= 0.1; 0.15 is not
    assert abs(text[("x:latency_seconds_sum", ())] - 0.3) < 1e-9
    created = [v for (name, _), v in text.items() if name == "x:requests_created"]
    assert created == [min(s.value for r in regs for m in r.collect() for s in m.samples if s.name == "x:requests_created")]
