"""API-key authentication as a `grpc.aio` server interceptor.

A call must carry `authorization: Bearer KEY` or `x-api-key: KEY` metadata, else it fails
with UNAUTHENTICATED before reaching the servicer. The health service stays open (load
balancers and orchestrators probe it without credentials).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if key == "x-api-key":
            return value
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: stream(None, ctx), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: unary(None, ctx), **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_keys: Iterable[str]):
        self._keys = [k.encode() for k in api_keys if k]
        if not self._keys:
            raise ValueError("ApiKeyInterceptor needs at least one non-empty API key")

    def _valid(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        return any(hmac.compare_digest(given, k) for k in self._keys)  # no early exit on a prefix match

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        key = key_from_metadata(handler_call_details.invocation_metadata)
        if key is None:
            return _deny(handler, "missing API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        if not self._valid(key):
            return _deny(handler, "invalid API key")
        return handler
