"""The read-only endpoints: GET /v1/models, /health, /version, /metrics.

/health, /version and /metrics need no API key (probes and scrapers have none); /metrics is
the same Prometheus registry `--metrics-port` serves (gRPC and HTTP requests together).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import urllib.request

from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.protocol import ModelCard, ModelList, now

_STARTED = now()


def version() -> str:
    try:
        return importlib.metadata.version("jaxengine")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def list_models(gate: EngineGate) -> JSONResponse:
    engine = gate.engine().engine
    root = getattr(engine.config, "model", None)
    card = ModelCard(id=gate.model_name, created=_STARTED, root=None if root is None else str(root),
                     max_model_len=engine.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


def health(gate: EngineGate) -> Response:
    """200 (empty, as vLLM's) only while the engine is loaded and alive and the server not
    draining; 503 with the reason otherwise."""
    problem = gate.health()
    return Response(status_code=200) if problem is None else problem.response()


def _fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read(), resp.headers.get("Content-Type", CONTENT_TYPE_LATEST)


async def metrics(gate: EngineGate) -> Response:
    if gate.options.metrics_url is not None:  # a front-end process: the whole server's, not this process's share
        body, content_type = await asyncio.to_thread(_fetch, gate.options.metrics_url)
        return Response(body, media_type=content_type)
    registry = gate.registry
    if registry is None:
        return Response(status_code=404)
    # On a thread: a scrape asks the engine for its gauges and waits for the answer.
    return Response(await asyncio.to_thread(generate_latest, registry), media_type=CONTENT_TYPE_LATEST)
