"""Which asyncio event loop the servers run on (`--loop`, as uvicorn's).

`auto` takes uvloop where it is installed (Linux; a dependency of the serving package there),
as uvicorn and vLLM's API server do: its C transports carry a streamed HTTP chunk for about half
the Python of the stock loop's, and a front-end process spends most of its time there. grpc.aio
runs on either loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    if loop not in LOOPS:
        raise ValueError(f"loop (--loop) must be one of {', '.join(LOOPS)}, got {loop!r}")
    if loop == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop), "
                             "or pass --loop asyncio") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """asyncio.run on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
