"""`EngineServicer`: the jaxengine.v1.EngineService RPCs on top of `AsyncEngine`.

Everything here runs on the server's asyncio loop and never waits on the engine: generation
streams come from `generate` (AsyncEngine, or EngineClient over an engine process), and
chat-template and Tokenize work runs on the engine thread (or process) through `call`. With
an engine process, `generate` tokenizes a text prompt on this loop (as vLLM's API server
does): milliseconds for long prompts, and never on the engine's step loop. Status codes:

- UNAVAILABLE: the model is still loading, the server is draining, or the engine (or another
  process the server needs) has died: calls in flight then end UNAVAILABLE too
  (`EngineServer.fail`);
- INVALID_ARGUMENT: the request can never run (message names the field and the limit): what
  the engine rejects with ValueError or TypeError, a chat request to a model without a chat
  template (the message says to pass `--chat-template`);
- RESOURCE_EXHAUSTED: more than `max_queue` requests are waiting for their first step;
- FAILED_PRECONDITION: text / chat asked of a model without a tokenizer;
- INTERNAL: the engine failed this request (other requests keep running).

A cancelled call or an expired deadline cancels the handler; leaving `AsyncEngine.generate`
aborts the request, which frees its KV blocks within a step.

The HTTP API (serving/openai_api/engine_gate.py) keeps its requests in the same state
(`active`, `num_pending`; it reads `engine`, `draining`, `failure`) and records them through
`record_output`, so `--max-queue`, drain, fail and the metrics cover both protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time

import grpc
from google.protobuf.message import DecodeError

from jaxengine.engine.async_engine import EngineDeadError, StreamingEngine
from jaxengine.engine.tokenizer import apply_chat_template
from jaxengine.outputs import RequestOutput
from serving import conversion
from serving.generated import engine_pb2 as pb
from serving.generated import engine_pb2_grpc
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngineService"].full_name
# serving/watchdog.py polls every 50 ms and waits up to 1 s for a dead child's exit status.
_NAME_THE_DEATH_SECONDS = 2.0


# Run on the engine (its thread, or its process: so module-level functions, not lambdas).
def _tokenize(engine, text: str) -> list[int]:
    return engine.tokenize(text)


def _chat_token_ids(engine, messages: list[dict], chat_template: str | None) -> list[int]:
    if chat_template is None:
        return engine.chat_token_ids(messages)
    return apply_chat_template(engine.tokenizer, messages, chat_template=chat_template)


def _decode(engine, ids: list[int], skip_special_tokens: bool) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _Failure(Exception):
    """A status to end the call with; raised inside, turned into `context.abort` outside."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class MalformedRequest:
    """What a request that does not parse turns into (so it becomes INVALID_ARGUMENT, not UNKNOWN)."""

    def __init__(self, message: str):
        self.message = message


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(f"could not parse the {cls.DESCRIPTOR.full_name} message: {e}")

    return parse


def _check_parsed(request) -> None:
    if isinstance(request, MalformedRequest):
        raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def add_to_server(servicer: "EngineServicer", server: grpc.aio.Server) -> None:
    """Like the generated `add_EngineServiceServicer_to_server`, with tolerant request parsing."""
    rpcs = {
        "Generate": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
        "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest, pb.TokenizeResponse),
        "Detokenize": (grpc.unary_unary_rpc_method_handler, pb.DetokenizeRequest, pb.DetokenizeResponse),
        "GetModelInfo": (grpc.unary_unary_rpc_method_handler, pb.GetModelInfoRequest, pb.ModelInfo),
    }
    handlers = {
        name: make(getattr(servicer, name), request_deserializer=_parser(req), response_serializer=resp.SerializeToString)
        for name, (make, req, resp) in rpcs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    def __init__(self, model_name: str, *, max_queue: int | None = None, metrics: ServingMetrics | None = None,
                 chat_template: str | None = None, sampling_defaults: dict | None = None):
        self.engine: StreamingEngine | None = None  # set once loaded and compiled
        self.model_name = model_name
        self.max_queue = max_queue
        self.metrics = metrics
        self.chat_template = chat_template  # None: the tokenizer's
        self.sampling_defaults = sampling_defaults or {}  # for the fields a request leaves unset
        self.draining = False
        self.failure: str | None = None  # what died, once the server cannot serve any more
        self.active: set[str] = set()  # request ids of calls in flight
        self.num_pending = 0  # accepted calls whose request has not produced anything yet
        self._ids = itertools.count()
        self._id_prefix = f"grpc-{os.getpid()}-{time.monotonic_ns() % 10**6}"

    # ------------------------------------------------------------------ helpers

    def _ready_engine(self) -> StreamingEngine:
        if self.failure is not None or (self.engine is not None and self.engine.is_dead):
            raise self._unavailable()
        if self.draining:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.engine is None:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health reports SERVING")
        return self.engine

    def _unavailable(self) -> _Failure:
        if self.failure is not None:
            what = f"the server cannot serve any more: {self.failure}"
        else:
            what = "the server is shutting down" if self.draining else "the engine has stopped"
        return _Failure(grpc.StatusCode.UNAVAILABLE, f"{what}; retry on another replica")

    async def _engine_gone(self) -> _Failure:
        """UNAVAILABLE for a call whose engine has died. The streams learn it first (their
        connection closes), the server's watchdog a moment later: wait for it to name what
        died, so the client's message says so."""
        loop = asyncio.get_running_loop()
        end = loop.time() + _NAME_THE_DEATH_SECONDS
        while self.failure is None and not self.draining and loop.time() < end:
            await asyncio.sleep(0.02)
        return self._unavailable()

    async def _on_engine(self, fn, *args):
        """Run fn(engine, *args) on the engine thread; ValueError -> INVALID_ARGUMENT, the
        engine gone -> UNAVAILABLE."""
        try:
            return await asyncio.wrap_future(self._ready_engine().call(fn, *args))
        except (ValueError, TypeError) as e:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except EngineDeadError:
            raise await self._engine_gone() from None

    def _need_tokenizer(self, what: str) -> None:
        if self._ready_engine().engine.tokenizer is None:
            raise _Failure(grpc.StatusCode.FAILED_PRECONDITION, f"this model has no tokenizer, so {what} cannot be used: send token_ids")

    async def _prompt(self, request: pb.GenerateRequest) -> str | list[int]:
        kind, value = conversion.prompt_input(request)
        if kind == "text":
            self._need_tokenizer("text prompts")
            return value
        if kind == "chat":
            self._need_tokenizer("chat messages")
            return await self._on_engine(_chat_token_ids, value, self.chat_template)
        return value

    # ------------------------------------------------------------------ Generate

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            _check_parsed(request)
            engine = self._ready_engine()
            try:
                rid = conversion.request_id(request)
                params = conversion.sampling_params(request.sampling_params, self.sampling_defaults)
                prompt = await self._prompt(request)
            except (ValueError, TypeError) as e:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            if self.max_queue is not None and self.num_pending >= self.max_queue:
                raise _Failure(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.num_pending} requests are already waiting (the server's --max-queue is {self.max_queue}); retry later",
                )
            rid = rid or f"{self._id_prefix}-{next(self._ids)}"
            if rid in self.active:
                raise _Failure(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in flight; use a unique id")
        except _Failure as f:
            await context.abort(f.code, f.message)
        failure, started = None, False
        self.active.add(rid)
        self.num_pending += 1
        pending = True
        try:
            async with contextlib.aclosing(engine.generate(prompt, params, request_id=rid, priority=request.priority)) as stream:
                last = None
                num_tokens = 0
                finished: set[int] = set()
                async for out in stream:
                    if self.failure is not None:  # aborted by `EngineServer.fail`: not a finish
                        raise self._unavailable()
                    started = True
                    if pending:
                        pending = False
                        self.num_pending -= 1
                    resp, n = self._response(out, finished, num_tokens)
                    num_tokens += n
                    if self.metrics is not None:
                        last = self.record_output(out, n, num_tokens, last)
                    yield resp
        except _Failure as f:
            failure = f
        except (ValueError, TypeError) as e:
            failure = _Failure(grpc.StatusCode.INVALID_ARGUMENT if not started else grpc.StatusCode.INTERNAL, str(e))
        except EngineDeadError as e:
            if self.failure is not None or self.draining or engine.is_dead:  # the engine is gone, not this request
                failure = await self._engine_gone()
            else:
                failure = _Failure(grpc.StatusCode.INTERNAL, f"the engine failed this request: {e}")
        except Exception as e:  # noqa: BLE001 - one call fails, the server goes on
            log.exception("request %s failed", rid)
            failure = _Failure(grpc.StatusCode.INTERNAL, f"request {rid} failed in the server: {type(e).__name__}: {e}")
        finally:
            self.active.discard(rid)
            if pending:
                self.num_pending -= 1
        if failure is not None:
            await context.abort(failure.code, failure.message)

    def _response(self, out: RequestOutput, finished: set[int], num_tokens: int) -> tuple[pb.GenerateResponse, int]:
        """The message for one engine delta, and how many tokens it carries."""
        deltas = conversion.completion_deltas(out, finished)
        n = sum(len(d.token_ids) for d in deltas)
        resp = pb.GenerateResponse(request_id=out.request_id, outputs=deltas, finished=out.finished)
        if out.finished:
            conversion.final_fields(resp, out, num_tokens + n)
        return resp, n

    def record_output(self, out: RequestOutput, n: int, total: int, last: float | None) -> float | None:
        """Per-request metrics for one output of `n` new tokens (`total` so far, this one's
        included); `last`: when the previous tokens came (returned updated). The HTTP API
        records its requests here too."""
        m, now = self.metrics, time.monotonic()
        if total == n and n:  # the first tokens of this request
            m.prompt_tokens.inc(len(out.prompt_token_ids))
        if n:
            m.generation_tokens.inc(n)
            if last is not None:
                gap = (now - last) / n
                for _ in range(n):
                    m.itl.observe(gap)
            last = now
        if out.finished:
            rm = out.metrics
            reason = next((o.finish_reason for o in out.outputs if o.finish_reason), "abort")
            m.request_finished(
                reason,
                None if rm.first_token_time is None else rm.first_token_time - rm.arrival_time,
                (rm.finished_time or now) - rm.arrival_time,
                None if rm.first_scheduled_time is None else rm.first_scheduled_time - rm.arrival_time,
            )
        return last

    # ------------------------------------------------------------------ unary RPCs

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        try:
            _check_parsed(request)
            try:
                kind, value = conversion.prompt_input(request)
            except ValueError as e:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            self._need_tokenizer("text" if kind == "text" else "chat messages")
            if kind == "text":
                ids = await self._on_engine(_tokenize, value)
            else:
                ids = await self._on_engine(_chat_token_ids, value, self.chat_template)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.engine.max_model_len)
        except _Failure as f:
            await context.abort(f.code, f.message)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        try:
            _check_parsed(request)
            self._need_tokenizer("Detokenize")
            ids = list(request.token_ids)
            vocab = self.engine.engine.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"token_ids must be in [0, {vocab}); got {bad[:5]}")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            text = await self._on_engine(_decode, ids, skip)
            return pb.DetokenizeResponse(text=text)
        except _Failure as f:
            await context.abort(f.code, f.message)

    async def GetModelInfo(self, request, context):
        try:
            _check_parsed(request)
            e = self._ready_engine().engine
        except _Failure as f:
            await context.abort(f.code, f.message)
        tok = e.tokenizer
        return pb.ModelInfo(
            model=self.model_name, architecture=e.model_config.architecture, max_model_len=e.max_model_len,
            dtype=str(e.dtype), vocab_size=e.model_config.vocab_size,
            tensor_parallel_size=int(getattr(e.config, "tensor_parallel_size", 1) or 1),
            block_size=e.config.block_size, num_kv_blocks=e.num_blocks, has_tokenizer=tok is not None,
            has_chat_template=tok is not None and bool(self.chat_template or tok.chat_template),
        )
