"""Shared fixtures: one tiny checkpoint, one AsyncEngine (compiled once) and one plain
server on a free localhost port for the whole serving suite. Tests that need another
server configuration (API key, TLS, --max-queue, loading) start a BackgroundServer around
the same engine."""

from __future__ import annotations

import time

import grpc
import pytest

from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from tests.serving.tiny_model import ENGINE_ARGS, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def async_engine(tiny_model):
    from jaxengine import AsyncEngine, Engine, EngineConfig

    engine = AsyncEngine(Engine(EngineConfig.from_kwargs(str(tiny_model), **ENGINE_ARGS), progress=False))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(async_engine):
    from serving.server import BackgroundServer, ServeOptions

    srv = BackgroundServer(async_engine, ServeOptions(port=0, model_name="tiny", metrics_port=0))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel):
    return engine_pb2_grpc.EngineServiceStub(channel)


def wait_idle(async_engine, timeout: float = 10.0) -> dict:
    """Poll until the engine has nothing running or waiting; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = async_engine.call(_idle_stats).result(timeout=10)
        if (stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["used_blocks"] == 0
                and not stats["unfinished"]) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _idle_stats(engine) -> dict:
    pool = engine.scheduler.kv_cache_manager.block_pool
    return dict(engine.stats(), used_blocks=sum(b.ref_cnt > 0 for b in pool.blocks[1:]),
                free_blocks=pool.num_free_blocks, total_blocks=pool.num_blocks - 1,
                unfinished=engine.has_unfinished_requests())


def request(prompt=None, *, messages=None, **sampling) -> pb.GenerateRequest:
    from serving.client import build_request

    return build_request(prompt, messages=messages, **sampling)


def collect(stub, req, **kw):
    """Run a Generate call; (responses, aggregated result)."""
    from serving.client import GenerateResult

    result, resps = GenerateResult("", []), []
    for resp in stub.Generate(req, **kw):
        resps.append(resp)
        result.add(resp)
    return resps, result
