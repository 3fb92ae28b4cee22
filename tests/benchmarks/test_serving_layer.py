"""The service-layer benchmark's synthetic engine drives the real server end to end: every
call completes with all its tokens, and a stream interval cuts the messages."""

from __future__ import annotations

import math

from benchmarks.serving import _load, summarize
from benchmarks.serving_layer import SyntheticEngine
from serving.generated import engine_pb2 as pb
from serving.server import BackgroundServer, ServeOptions


def _serve(interval: int) -> dict:
    import asyncio

    engine = SyntheticEngine(0.002, running=8, output_len=12, stream_interval=interval)
    server = BackgroundServer(engine, ServeOptions(port=0, model_name="synthetic"))
    try:
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling_params=pb.SamplingParams(max_tokens=12))
                .SerializeToString() for _ in range(20)]
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
