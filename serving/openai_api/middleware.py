"""ASGI pieces around the routes: the request body limit, and the API-key check.

`BodyLimit` reads a POST's whole body before the app does (every route parses all of it
anyway), so a body over the limit is a 413 before any JSON is parsed, whether or not it
said its length; the app then reads the buffered body, and later `receive`s (the wait for a
disconnect) go to the connection.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.openai_api.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                             "(--http-max-body-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)


def api_key_check(keys: Iterable[str]):
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer KEY` (or
    `x-api-key: KEY`, as the gRPC service takes) for one of `keys`."""
    valid = [k.encode() for k in keys if k]

    async def check(request: Request) -> None:
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = token.strip()
        if given is None:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not any(hmac.compare_digest(given.encode(), k) for k in valid):  # no early exit on a prefix
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    return check
