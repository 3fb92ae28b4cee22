"""The service-layer benchmark's synthetic engine drives the real server end to end: every
call completes with all its tokens, and a stream interval cuts the messages. The load
generator split over client processes sends every request once."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing

from benchmarks.serving import _load, completion_body, run_load_split, summarize
from benchmarks.serving_layer import SyntheticEngine
from serving.generated import engine_pb2 as pb
from serving.server import BackgroundServer, ServeOptions


def _serve(interval: int, client_processes: int = 0) -> dict:
    import asyncio

    engine = SyntheticEngine(0.002, running=8, output_len=12, stream_interval=interval)
    server = BackgroundServer(engine, ServeOptions(port=0, model_name="synthetic"))
    try:
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling_params=pb.SamplingParams(max_tokens=12))
                .SerializeToString() for _ in range(20)]
        if client_processes:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(client_processes, mp_context=ctx) as pool:
                records, duration = run_load_split(pool, client_processes, server.address, reqs, 200.0, 4, 0, None, 1)
        else:
            records, duration = asyncio.run(_load(server.address, reqs, math.inf, None, 0, None, 2))
    finally:
        server.close()
        engine.shutdown()
    return summarize(records, duration)


def test_synthetic_engine_through_the_real_server():
    one, four = _serve(1), _serve(4)
    for s in (one, four):
        assert s["completed"] == 20 and s["failed"] == 0 and s["total_output_tokens"] == 20 * 12
    assert four["tokens_per_message"] >= 3  # at least 4 per message but the first and last: 1 + 4 + 4 + 3


def test_load_split_over_client_processes():
    s = _serve(1, client_processes=2)
    assert s["completed"] == 20 and s["failed"] == 0 and s["total_output_tokens"] == 20 * 12
    assert s["duration_s"] >= 20 / 200.0 * 0.5  # Poisson arrivals at 200/s in all: not all at once


def test_openai_backend_through_the_real_http_server():
    """The load generator's HTTP path: every streamed completion counted with all its tokens."""
    import asyncio

    engine = SyntheticEngine(0.002, running=8, output_len=12, stream_interval=1)
    server = BackgroundServer(engine, ServeOptions(port=0, model_name="synthetic", http_port=0))
    try:
        reqs = [completion_body("synthetic", [1, 2], dict(max_tokens=12)) for _ in range(20)]
        records, duration = asyncio.run(_load(f"http://127.0.0.1:{server.server.http_port}", reqs, math.inf, None, 0,
                                              None, 1))
    finally:
        server.close()
        engine.shutdown()
    s = summarize(records, duration)
    assert s["completed"] == 20 and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == 20 * 12
    # Token by token, but for what a stream that fell behind the engine coalesced
    assert 1.0 <= s["tokens_per_message"] < 2.0 and all(r["ttft"] is not None for r in records)
