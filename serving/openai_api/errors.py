"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `ApiError`; the app's handlers (`install_error_handlers`) turn it, FastAPI's
validation errors (400 naming the field) and Starlette's own HTTP errors (404 for an unknown
path, 405) into that shape. Status codes, as OpenAI and vLLM use them:

- 400 a request that can never run: a bad field (its name in `param`), a prompt longer than
  max_model_len, a chat request to a model without a chat template;
- 401 a missing or wrong API key; 404 an unknown `model`; 413 a body over the size limit;
- 429 the queue is full (`--max-queue`): retry later;
- 503 the model is still loading, the server is draining, or the engine has died: retry
  elsewhere; 500 the server failed this request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, code="service_unavailable")


def field_path(loc: Sequence[str | int]) -> str:
    """pydantic's error location as the client wrote it: ("body", "messages", 0, "content")
    -> "messages[0].content"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return invalid("the request body is not valid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    path = field_path(first.get("loc", ()))
    if not path and first.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return invalid("the request body must be a JSON object (and sent with Content-Type: application/json)")
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):  # our own validators' messages, without pydantic's prefix
        msg = msg[len("Value error, "):]
    if first.get("type") == "missing":
        return invalid(f"{path} is required", param=path or None)
    return invalid(f"{path}: {msg}" if path else msg, param=path or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            detail = (f"there is no {request.method} {request.url.path} here "
                      "(see /v1/models, /v1/completions, /v1/chat/completions)")
        resp = ApiError(exc.status_code, detail).response()
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"the server failed this request: {type(exc).__name__}: {exc}").response()
