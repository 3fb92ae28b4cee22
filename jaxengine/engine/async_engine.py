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
from collections.abc import AsyncIterator
from typing import Any

from jaxengine.config import EngineConfig
from jaxengine.engine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine.llm_engine import Engine
from jaxengine.outputs import OutputKind, OutputRecord, RequestOutput
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


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

    def put(self, item: Any, num_tokens: int, last: bool) -> None:
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
        merged: dict[int, list] = {}
        for rec in run:
            for c in rec[6]:
                m = merged.get(c[0])
                if m is None:
                    merged[c[0]] = list(c)
                    continue
                m[1] += c[1]
                m[2] = m[2] + c[2]
                if c[4] is not None:
                    m[4] = (m[4] or []) + c[4]
                m[3], m[5], m[6] = c[3], c[5], c[6]
        prompt_logprobs = next((r[7] for r in reversed(run) if r[7] is not None), None)
        last = last[:6] + [list(merged.values()), prompt_logprobs]
    return RequestOutput.from_record(last)


def _deliver(batch: list[tuple[_Stream, Any, int, bool]]) -> None:
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
        prompt: str | list[int],
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

    def _submit(self, prompt, params, rid: str, kind: OutputKind, priority: int) -> concurrent.futures.Future:
        """Have the engine add the request; a Future of its id (or the ValueError)."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Run `fn(engine, *args)` where the engine runs (stats, tokenizer, ...); a Future."""
        raise NotImplementedError

    def shutdown(self, timeout: float | None = 10.0) -> None:
        raise NotImplementedError

    def _send_records(self, records: list[OutputRecord]) -> None:
        """A step's OutputRecords to their streams."""
        self._send_all([(r[0], r, sum(len(c[2]) for c in r[6]), r[3]) for r in records])

    def _send_all(self, items: list[tuple[str, Any, int, bool]]) -> None:
        """Hand a step's outputs over, as (request id, item, its new tokens, last for this
        request): one wake-up per caller event loop, not per request (each
        call_soon_threadsafe costs the sending thread a lock and a self-pipe write)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item, num_tokens, last in items:
            entry = self._streams.get(rid)
            if entry is None:
                continue
            loop, stream = entry
            if last:
                del self._streams[rid]
            by_loop.setdefault(loop, []).append((stream, item, num_tokens, last))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass


class AsyncEngine(StreamingEngine):
    """The Engine driven from a thread of this process. All engine calls happen on that
    thread; callers talk to it through an inbox of commands (add/abort/call), so the asyncio
    loop (e.g. the gRPC server) never blocks on a step and the engine never waits on the loop."""

    def __init__(self, engine: Engine | DataParallelEngine | EngineConfig):
        super().__init__()
        self.engine = make_engine(engine) if isinstance(engine, EngineConfig) else engine
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxengine-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: Any) -> "AsyncEngine":
        return cls(EngineConfig.from_kwargs(model, **engine_args))

    def _submit(self, prompt, params, rid, kind, priority) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", fut, (prompt, params, rid, kind, priority)))
        return fut

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", None, request_id))

    def call(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fut, (fn, args)))
        return fut

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopped.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout)
        close = getattr(self.engine, "close", None)  # multi-host: release the followers
        if close is not None and not self._thread.is_alive():
            close()

    # ------------------------------------------------------------------ engine thread

    def _handle(self, cmd: str, fut, arg) -> None:
        engine = self.engine
        if cmd == "add":
            prompt, params, rid, kind, prio = arg
            if not fut.set_running_or_notify_cancel():  # the caller gave up already
                return
            try:
                rid = engine.add_request(prompt, params, request_id=rid, output_kind=kind, priority=prio)
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
        self._send_all([(rid, error, 0, True)])

    def _loop(self) -> None:
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
        for rid in list(self._streams):
            self._send(rid, EngineDeadError("engine shut down"))
