"""The OpenAI-compatible HTTP app (FastAPI): its routes, and what wraps them.

    GET  /v1/models  /health  /version  /metrics
    POST /v1/completions  /v1/chat/completions  /tokenize  /detokenize

Around the routes, outermost first: CORS (only with `--allowed-origins`), the body size
limit, then the API-key check on every route but /health, /version and /metrics. The routes'
logic lives in completions.py, chat.py, tokenization.py and server_info.py; the engine is
reached through `EngineGate`, the gRPC servicer's state.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from serving.openai_api import server_info
from serving.openai_api.chat import create_chat_completion
from serving.openai_api.completions import create_completion
from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.errors import install_error_handlers
from serving.openai_api.middleware import BodyLimit, api_key_check
from serving.openai_api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from serving.openai_api.streaming import ClientDisconnected
from serving.openai_api.tokenization import detokenize, tokenize


def build_app(gate: EngineGate) -> FastAPI:
    opts = gate.options
    app = FastAPI(title="jaxengine OpenAI-compatible API", version=server_info.version(), docs_url=None,
                  redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the connection is closed

    open_routes = APIRouter()

    @open_routes.get("/health")
    async def health() -> Response:
        return server_info.health(gate)

    @open_routes.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": server_info.version()})

    @open_routes.get("/metrics")
    async def metrics() -> Response:
        return await server_info.metrics(gate)

    deps = [Depends(api_key_check(opts.api_keys))] if opts.api_keys else []
    api = APIRouter(dependencies=deps)

    @api.get("/v1/models")
    async def models() -> JSONResponse:
        return server_info.list_models(gate)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(gate, body, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(gate, body, request)

    @api.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> JSONResponse:
        return await tokenize(gate, body)

    @api.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> JSONResponse:
        return await detokenize(gate, body)

    app.include_router(open_routes)
    app.include_router(api)
    app.add_middleware(BodyLimit, max_bytes=opts.max_body_bytes)
    if opts.allowed_origins:  # added last: outermost, so preflights are answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app
