"""Server-sent events, and the client going away.

- `sse(model)` / `DONE`: one `data: {json}\\n\\n` event; the stream ends with `data: [DONE]`.
- `EventStream`: a StreamingResponse that closes its iterator and runs `on_close` however the
  response ends (a client that disconnects cancels the send; closing the engine streams
  aborts their requests within a step).
- `until_disconnected`: run a coroutine (a non-streaming generation, or the wait for a
  stream's first outputs) but cancel it when the client disconnects first.
- `started` / `merged`: several engine streams (one per prompt) started together, then read
  as one, in arrival order; `open_stream` puts it together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

from jaxengine.outputs import RequestOutput
from serving.openai_api.errors import ApiError

T = TypeVar("T")
DONE = "data: [DONE]\n\n"


def sse(event: BaseModel | dict) -> str:
    body = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {body}\n\n"


def error_event(error: ApiError) -> str:
    """What a stream that fails after its 200 sends (the openai client raises APIError)."""
    return sse(error.body)


class EventStream(StreamingResponse):
    """`on_close` runs however the response ends, even when the client left before the
    body's generator ever started (then its own `finally` never runs)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # runs even when the send was cancelled
                await self.body_iterator.aclose()
                await self.on_close()


class ClientDisconnected(Exception):
    """The client went away before its response; the app answers it with nothing (499)."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (which aborts
    its engine requests) and ClientDisconnected raised."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.done() or task.cancelled():
        raise ClientDisconnected()
    return task.result()


class Started(NamedTuple):
    """An engine stream whose first output has arrived (so the request was accepted)."""

    index: int  # which prompt
    first: RequestOutput
    rest: AsyncIterator[RequestOutput]


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await stream.__anext__()


async def started(streams: list[AsyncIterator[RequestOutput]]) -> list[Started]:
    """Start every stream and wait for each one's first output, so a request the engine
    rejects (a prompt too long, say) fails before the response starts. On any failure every
    stream is closed (aborting its request) and the first error raised."""
    try:
        firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    except BaseException:  # cancelled (the client went away): the gathered tasks were cancelled too
        await _close_all(streams)
        raise
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        await _close_all(streams)
        raise errors[0]
    return [Started(i, first, s) for i, (first, s) in enumerate(zip(firsts, streams))]


async def close(streams: list[Started]) -> None:
    """Close every stream (aborting the requests still running); closed ones are skipped."""
    await _close_all([s.rest for s in streams])


async def open_stream(request: Request, streams: list[AsyncIterator[RequestOutput]], release: Callable[[], None],
                      events: Callable[[list[Started]], AsyncIterator[str]]) -> EventStream:
    """The SSE response of `events(started streams)`, once every stream has its first output
    (before that, errors are raised: the caller answers them with an error status). `release`
    runs once the response is over, however it ends."""
    try:
        first = await until_disconnected(request, started(streams))
    except BaseException:
        release()
        raise

    async def on_close() -> None:
        await close(first)
        release()

    return EventStream(events(first), on_close)


async def _close_all(streams: list[AsyncIterator]) -> None:
    for s in streams:
        with contextlib.suppress(Exception):
            await s.aclose()


class Item(NamedTuple):
    index: int  # which prompt
    output: RequestOutput


async def merged(streams: list[Started]) -> AsyncIterator[Item]:
    """Every stream's outputs as they arrive. One stream is read directly; several through a
    queue, one task each. Closing this closes them all (their requests are aborted)."""
    if len(streams) == 1:
        (s,) = streams
        try:
            yield Item(s.index, s.first)
            if not s.first.finished:
                async for out in s.rest:
                    yield Item(s.index, out)
        finally:
            await s.rest.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(s: Started) -> None:
        try:
            await queue.put(Item(s.index, s.first))
            if not s.first.finished:
                async for out in s.rest:
                    await queue.put(Item(s.index, out))
            await queue.put(None)
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_all([s.rest for s in streams])
