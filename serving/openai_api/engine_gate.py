"""`EngineGate`: the HTTP routes' way to the engine, through the gRPC servicer's state, so
both protocols are one server: one engine, one queue limit (`--max-queue` counts requests
of both that wait for their first output), one set of calls in flight (`EngineServer.drain`
and `fail` wait for and abort HTTP requests as gRPC calls), one set of metrics.

Errors come out as `ApiError`s: 503 while the model loads, while draining and once the
engine has died; 429 when the queue is full; 400 for what the engine rejects (ValueError).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from jaxengine.engine.async_engine import EngineDeadError, StreamingEngine
from jaxengine.engine.input_processor import Prompt
from jaxengine.outputs import RequestOutput
from jaxengine.sampling_params import SamplingParams
from serving.openai_api.errors import ApiError, invalid, unavailable
from serving.openai_api.options import HttpOptions
from serving.servicer import EngineServicer

# serving/watchdog.py needs up to ~1 s to name a dead engine process (as the servicer waits).
_NAME_THE_DEATH_SECONDS = 2.0


@dataclasses.dataclass
class Ticket:
    """One admitted engine request: counted as waiting (for `--max-queue`) until its first
    output, and in flight (for drain and fail) until it ends."""

    request_id: str
    pending: bool = True


class EngineGate:
    def __init__(self, servicer: EngineServicer, options: HttpOptions):
        self.servicer = servicer
        self.options = options

    @property
    def model_name(self) -> str:
        return self.options.model_name

    @property
    def chat_template(self) -> str | None:
        return self.servicer.chat_template

    @property
    def sampling_defaults(self) -> dict:
        return self.servicer.sampling_defaults

    @property
    def registry(self) -> CollectorRegistry | None:
        return None if self.servicer.metrics is None else self.servicer.metrics.registry

    def health(self) -> ApiError | None:
        """Why the server cannot take requests now (None: it can)."""
        s = self.servicer
        if s.failure is not None or (s.engine is not None and s.engine.is_dead):
            what = f"the server cannot serve any more: {s.failure}" if s.failure else "the engine has stopped"
            return unavailable(f"{what}; retry on another replica")
        if s.draining:
            return unavailable("the server is shutting down; retry on another replica")
        if s.engine is None:
            return unavailable("the model is still loading; retry when /health answers 200")
        return None

    def engine(self) -> StreamingEngine:
        problem = self.health()
        if problem is not None:
            raise problem
        return self.servicer.engine

    def tokenizer(self) -> Any:
        """The tokenizer of this process (the engine's, or an engine process's copy), for
        token strings and prompt text; 400 when the model has none."""
        tok = self.engine().engine.tokenizer
        if tok is None:
            raise invalid("this model has no tokenizer, so text and chat messages cannot be used: send token ids")
        return tok

    @property
    def max_model_len(self) -> int:
        return self.engine().engine.max_model_len

    async def engine_gone(self) -> ApiError:
        """503 for a request whose engine died: the streams learn it before the watchdog,
        so wait (briefly) for it to name what died."""
        loop = asyncio.get_running_loop()
        end = loop.time() + _NAME_THE_DEATH_SECONDS
        s = self.servicer
        while s.failure is None and not s.draining and loop.time() < end:
            await asyncio.sleep(0.02)
        return self.health() or unavailable("the engine has stopped; retry on another replica")

    async def call(self, fn, *args: Any) -> Any:
        """fn(engine, *args) where the engine runs; ValueError/TypeError -> 400."""
        try:
            return await asyncio.wrap_future(self.engine().call(fn, *args))
        except (ValueError, TypeError) as e:
            raise invalid(str(e)) from None
        except EngineDeadError:
            raise await self.engine_gone() from None

    def admit(self, request_ids: list[str]) -> list[Ticket]:
        """Tickets for a request's engine requests, or 429 when `max_queue` requests (gRPC's
        and HTTP's) already wait for their first output."""
        self.engine()
        s = self.servicer
        if s.max_queue is not None and s.num_pending >= s.max_queue:
            raise ApiError(429, f"{s.num_pending} requests are already waiting (the server's --max-queue is "
                                f"{s.max_queue}); retry later", code="queue_full")
        s.num_pending += len(request_ids)
        s.active.update(request_ids)
        return [Ticket(rid) for rid in request_ids]

    def _settle(self, ticket: Ticket) -> None:
        if ticket.pending:
            ticket.pending = False
            self.servicer.num_pending -= 1

    def release(self, tickets: list[Ticket]) -> None:
        """The request is over (idempotent; a `generate` that never started, too)."""
        for t in tickets:
            self._settle(t)
            self.servicer.active.discard(t.request_id)

    async def generate(self, ticket: Ticket, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's DELTA outputs for one request. Leaving early (or being cancelled:
        the client went away) aborts it, which frees its KV blocks within a step."""
        s = self.servicer
        try:
            engine = self.engine()
            last, total = None, 0
            async with contextlib.aclosing(engine.generate(prompt, params, request_id=ticket.request_id)) as stream:
                async for out in stream:
                    if s.failure is not None:  # aborted by `EngineServer.fail`: not a finish
                        raise self.health()
                    self._settle(ticket)
                    n = sum(len(o.token_ids) for o in out.outputs)
                    total += n
                    if s.metrics is not None:
                        last = s.record_output(out, n, total, last)
                    yield out
        except (ValueError, TypeError) as e:  # the engine's checks: the prompt, its length, n, ...
            message = str(e)
            code = "context_length_exceeded" if "max_model_len" in message else None  # OpenAI's code for it
            raise ApiError(400, message, code=code) from None
        except EngineDeadError as e:
            if s.failure is not None or s.draining or s.engine is None or s.engine.is_dead:
                raise await self.engine_gone() from None
            raise ApiError(500, f"the engine failed this request: {e}") from None
        finally:
            self._settle(ticket)
            s.active.discard(ticket.request_id)
