"""AsyncEngine: the Engine driven from its own thread, with asyncio streams per request.

All engine calls happen on the engine thread; callers talk to it through an inbox of
commands (add/abort), so the asyncio loop (e.g. the gRPC server) never blocks on a step and
the engine never waits on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from jaxengine.config import EngineConfig
from jaxengine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine import Engine
from jaxengine.outputs import OutputKind, RequestOutput
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


def _deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Engine | DataParallelEngine | EngineConfig):
        self.engine = make_engine(engine) if isinstance(engine, EngineConfig) else engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxengine-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: Any) -> "AsyncEngine":
        return cls(EngineConfig.from_kwargs(model, **engine_args))

    # ------------------------------------------------------------------ callers (any thread / loop)

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
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", fut, (prompt, params, request_id, output_kind, priority, loop, stream)))
        try:
            rid = await asyncio.wrap_future(fut)  # ValueError for bad input, raised here
        except asyncio.CancelledError:
            # Cancelled while the engine thread may already be adding it: abort it once added.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self.abort(f.result()))
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

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", None, request_id))

    def call(self, fn, *args):
        """Run `fn(engine, *args)` on the engine thread (stats, tokenizer, ...); a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fut, (fn, args)))
        return fut

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

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
            prompt, params, rid, kind, prio, loop, stream = arg
            if not fut.set_running_or_notify_cancel():  # the caller gave up already
                return
            try:
                rid = engine.add_request(prompt, params, request_id=rid, output_kind=kind, priority=prio)
            except Exception as e:  # bad input: the caller gets it, the engine goes on
                fut.set_exception(e)
                return
            self._streams[rid] = (loop, stream)
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

    def _send(self, rid: str, item) -> None:
        self._send_all([(rid, item)])

    def _send_all(self, items: list[tuple[str, Any]]) -> None:
        """Hand a step's outputs over: one wake-up per caller event loop, not per request
        (each call_soon_threadsafe costs the engine thread a lock and a self-pipe write)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            entry = self._streams.get(rid)
            if entry is None:
                continue
            loop, stream = entry
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
            by_loop.setdefault(loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

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
                outputs = engine.step()
            except Exception as e:  # fail the requests in flight, keep serving new ones
                log.exception("engine step failed")
                rids = list(self._streams)
                engine.abort_request(rids)
                engine.step()
                for rid in rids:
                    self._send(rid, EngineDeadError(f"engine step failed: {e!r}"))
                continue
            self._send_all([(out.request_id, out) for out in outputs])
        for rid in list(self._streams):
            self._send(rid, EngineDeadError("engine shut down"))
