"""AsyncEngine: the Engine driven from its own thread, with asyncio streams per request.

`StreamingEngine` holds what callers see (a stream of outputs per request, coalesced when
the consumer falls behind); `AsyncEngine` runs the engine on a thread of this process, and
`jaxengine.engine.engine_process.EngineProcess` in a child process (so a busy gRPC loop never
holds the engine's GIL).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from jaxengine.config import EngineConfig
from jaxengine.engine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine.input_processor import Prompt
from jaxengine.engine.llm_engine import Engine
from jaxengine.outputs import CompletionRecord, OutputKind, OutputRecord, RequestOutput
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class StreamItem(NamedTuple):
    """What a StreamingEngine hands one request's stream (`_send_all`)."""

    request_id: str
    item: OutputRecord | BaseException  # an error ends the stream
    num_tokens: int  # new tokens in it (for stream_interval)
    last: bool  # the request's last item


class _Stream:
    """A request's outputs on their way to its consumer, on the consumer's event loop.

    `put` only appends; `get` takes everything that has arrived and combines it into one
    output (DELTA: merged; CUMULATIVE: the newest), as vLLM's output collector does. Under
    load the consumer then sends fewer, larger messages instead of falling further behind the
    engine one message per token, and what it skips is never built (`combine_records`).
    With `interval` > 1, `get` also waits until that many new tokens are there (the first
    output and the last go at once): vLLM's stream_interval."""

    __slots__ = ("kind", "items", "ready", "interval", "new_tokens", "closed", "started")

    def __init__(self, kind: OutputKind, interval: int = 1):
        self.kind = kind
        self.items: collections.deque = collections.deque()  # OutputRecords, then maybe an error
        self.ready = asyncio.Event()
        self.interval = interval
        self.new_tokens = 0  # arrived since the last get
        self.closed = False  # the last item (finished output or error) has arrived
        self.started = False  # something was handed out already

    def _due(self) -> bool:
        """Something to hand out now (with stream_interval: enough of it, or the first or last)."""
        return bool(self.items) and (self.interval == 1 or self.closed or not self.started
                                     or self.new_tokens >= self.interval)

    def put(self, item: OutputRecord | BaseException, num_tokens: int, last: bool) -> None:
        self.items.append(item)
        self.new_tokens += num_tokens
        self.closed = self.closed or last
        if self._due():
            self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self._due():
            self.ready.clear()
            await self.ready.wait()
        self.started, self.new_tokens = True, 0
        items = self.items
        if isinstance(items[0], BaseException):
            return items.popleft()
        run = [items.popleft()]
        while items and not isinstance(items[0], BaseException):
            run.append(items.popleft())
        return combine_records(self, run)


def combine_records(stream: _Stream, run: list[OutputRecord]) -> RequestOutput:
    """The OutputRecords a stream received since it was last read, as one RequestOutput
    (DELTA records merged before anything is built; otherwise the newest)."""
    last = run[-1]
    if stream.kind is OutputKind.DELTA and len(run) > 1:
        merged: dict[int, CompletionRecord] = {}
        for rec in run:
            for c in rec.completions:
                m = merged.get(c.index)
                # The newest cumulative_logprob, finish_reason and stop_reason; text, tokens and
                # logprobs concatenated.
                merged[c.index] = c if m is None else c._replace(
                    text=m.text + c.text, token_ids=m.token_ids + c.token_ids,
                    logprobs=m.logprobs if c.logprobs is None else (m.logprobs or []) + c.logprobs)
        prompt_logprobs = next((r.prompt_logprobs for r in reversed(run) if r.prompt_logprobs is not None), None)
        last = last._replace(completions=list(merged.values()), prompt_logprobs=prompt_logprobs)
    return RequestOutput.from_record(last)


def _deliver(batch: list[tuple[_Stream, OutputRecord | BaseException, int, bool]]) -> None:
    for stream, item, num_tokens, last in batch:
        stream.put(item, num_tokens, last)


class StreamingEngine:
    """Per-request asyncio streams over an engine that runs elsewhere: on a thread of this
    process (`AsyncEngine`) or in a process of its own (`jaxengine.engine.engine_process.EngineProcess`).
    Subclasses carry the commands (`_submit`, `abort`, `call`, `shutdown`) and hand each step's
    outputs to `_send_all` from whichever thread receives them."""

    engine: Any  # the engine (AsyncEngine) or what the server needs to know of it (EngineProcess)

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, _Stream]] = {}
        self._ids = itertools.count()
        self._id_prefix = f"async-{os.getpid()}-{time.monotonic_ns() % 10**6}"

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        output_kind: OutputKind = OutputKind.DELTA,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early (or being cancelled)
        aborts the request, which frees its KV blocks within a step."""
        rid = request_id if request_id is not None else f"{self._id_prefix}-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        stream = _Stream(output_kind, self.engine.config.stream_interval)
        self._streams[rid] = (asyncio.get_running_loop(), stream)  # before the engine can answer
        fut = self._submit(prompt, params, rid, output_kind, priority)
        try:
            await asyncio.wrap_future(fut)  # ValueError for bad input, raised here
        except asyncio.CancelledError:
            # Cancelled while the engine may already be adding it: abort it once added, or drop
            # its stream if it never will be (nothing would ever finish that stream).
            def settle(f: concurrent.futures.Future) -> None:
                if f.cancelled() or f.exception() is not None:
                    self._streams.pop(rid, None)
                else:
                    self.abort(rid)

            fut.add_done_callback(settle)
            raise
        except BaseException:
            self._streams.pop(rid, None)
            raise
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def _submit(self, prompt: Prompt, params: SamplingParams | None, rid: str, kind: OutputKind,
                priority: int) -> concurrent.futures.Future:
        """Have the engine add the request; a Future of its id (or the ValueError)."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(engine, *args)` where the engine runs (stats, tokenizer, ...); a Future."""
        raise NotImplementedError

    def shutdown(self, timeout: float | None = 10.0) -> None:
        raise NotImplementedError

    @property
    def is_dead(self) -> bool:
        """The engine has stopped for good (shut down, or its thread or process died): no
        request can run any more. Set before the streams in flight get their EngineDeadError.
        False here: an engine that cannot die (a test double) need not say so."""
        return False

    def _send_records(self, records: list[OutputRecord]) -> None:
        """A step's OutputRecords to their streams (`_send_all`'s routing, inlined: this runs
        for every request of every step)."""
        streams = self._streams
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for r in records:
            entry = streams.get(r.request_id)
            if entry is None:
                continue
            loop, stream = entry
            last = r.finished
            if last:
                del streams[r.request_id]
            num_tokens = sum(len(c.token_ids) for c in r.completions)
            by_loop.setdefault(loop, []).append((stream, r, num_tokens, last))
        self._wake(by_loop)

    def _send_all(self, items: list[StreamItem]) -> None:
        """Hand items to their streams: one wake-up per caller event loop, not per request
        (each call_soon_threadsafe costs the sending thread a lock and a self-pipe write)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for it in items:
            entry = self._streams.get(it.request_id)
            if entry is None:
                continue
            loop, stream = entry
            if it.last:
                del self._streams[it.request_id]
            by_loop.setdefault(loop, []).append((stream, it.item, it.num_tokens, it.last))
        self._wake(by_loop)

    @staticmethod
    def _wake(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass


class _Add(NamedTuple):
    """An "add" command for the engine thread."""

    prompt: Prompt
    params: SamplingParams | None
    request_id: str
    kind: OutputKind
    priority: int


class AsyncEngine(StreamingEngine):
    """The Engine driven from a thread of this process. All engine calls happen on that
    thread; callers talk to it through an inbox of commands (add/abort/call), so the asyncio
    loop (e.g. the gRPC server) never blocks on a step and the engine never waits on the loop."""

    def __init__(self, engine: Engine | DataParallelEngine | EngineConfig):
        super().__init__()
        self.engine = make_engine(engine) if isinstance(engine, EngineConfig) else engine
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._ended = False  # the engine thread has stopped stepping (set before it fails the streams)
        self._thread = threading.Thread(target=self._loop, name="jaxengine-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: Any) -> "AsyncEngine":
        return cls(EngineConfig.from_kwargs(model, **engine_args))

    def _submit(self, prompt: Prompt, params: SamplingParams | None, rid: str, kind: OutputKind,
                priority: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", fut, _Add(prompt, params, rid, kind, priority)))
        return fut

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", None, request_id))

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fut, (fn, args)))
        return fut

    @property
    def is_dead(self) -> bool:
        return self._ended or not self._thread.is_alive()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopped.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.close()  # multi-host: releases the followers

    # ------------------------------------------------------------------ engine thread

    def _handle(self, cmd: str, fut: concurrent.futures.Future | None, arg: Any) -> None:
        engine = self.engine
        if cmd == "add":
            if not fut.set_running_or_notify_cancel():  # the caller gave up already
                return
            try:
                rid = engine.add_request(arg.prompt, arg.params, request_id=arg.request_id, output_kind=arg.kind,
                                         priority=arg.priority)
            except Exception as e:  # bad input: the caller gets it, the engine goes on
                fut.set_exception(e)
                return
            fut.set_result(rid)
        elif cmd == "abort":
            if arg in self._streams:
                engine.abort_request(arg)
        elif cmd == "call":
            fn, args = arg
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(engine, *args))
            except Exception as e:
                fut.set_exception(e)

    def _send(self, rid: str, error: BaseException) -> None:
        self._send_all([StreamItem(rid, error, 0, True)])

    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException:
            log.exception("the engine thread died")
            raise
        finally:  # shut down, or died of an error: no stream may be left waiting for ever
            self._ended = True
            reason = "engine shut down" if self._stopped.is_set() else "the engine thread died"
            for rid in list(self._streams):
                self._send(rid, EngineDeadError(reason))

    def _steps(self) -> None:
        engine = self.engine
        while not self._stopped.is_set():
            block = not engine.has_unfinished_requests()
            try:
                while True:
                    cmd, fut, arg = self._inbox.get(block=block, timeout=0.5 if block else None)
                    self._handle(cmd, fut, arg)
                    block = False
            except queue.Empty:
                pass
            if not engine.has_unfinished_requests():
                continue
            try:
                records = engine.step_records()
            except Exception as e:  # fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                rids = list(self._streams)
                engine.abort_request(rids)
                engine.step_records()
                for rid in rids:
                    self._send(rid, EngineDeadError(f"engine step failed: {e!r}"))
                continue
            self._send_records(records)
