"""What a server cannot serve without, watched: the engine (its child process, or its thread)
and the front-end processes. The first of them to end is reported once, as a `Death` that
names it and says how it ended (exit code, or the signal that killed it), so the server can
turn health NOT_SERVING at once, end the calls in flight with UNAVAILABLE and exit non-zero
(`EngineServer.fail`), instead of answering every call INTERNAL for ever.

Polling, not callbacks: `multiprocessing` offers no exit callback, and a probe that reads a
flag and calls `waitpid(WNOHANG)` costs microseconds, so every 50 ms is "at once" for a
health checker and nothing for the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable

from jaxengine.engine.async_engine import StreamingEngine
from jaxengine.engine.engine_process import EngineClient, EngineProcess

POLL_SECONDS = 0.05
# An engine child that has closed its connection is exiting; give the kernel this long to
# report its exit status before the log line says "closed its connection" without one.
_EXIT_STATUS_WAIT = 1.0


@dataclasses.dataclass(frozen=True)
class Death:
    what: str  # "the engine process (pid 1234)"
    how: str  # "was killed by signal 9 (SIGKILL)"

    def __str__(self) -> str:
        return f"{self.what} {self.how}"


Probe = Callable[[], "Death | None"]


def exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its connection"
    if exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-exitcode}{name}"
    return f"exited with code {exitcode}"


def process_probe(what: str, process) -> Probe:
    """A `multiprocessing.Process` that must stay alive."""

    def probe() -> Death | None:
        if process.is_alive():
            return None
        return Death(f"{what} (pid {process.pid})", exit_description(process.exitcode))

    return probe


def engine_probe(engine: StreamingEngine) -> Probe:
    """The engine behind a server: a child process this process started (`EngineProcess`), a
    connection to one started elsewhere (`EngineClient`, in a front-end process), or a thread
    of this process (`AsyncEngine`)."""
    dead_since: list[float] = []

    def probe() -> Death | None:
        if not engine.is_dead:
            return None
        if isinstance(engine, EngineProcess):
            process = engine.process
            if process.is_alive():
                dead_since[:] = dead_since or [time.monotonic()]
                if time.monotonic() - dead_since[0] < _EXIT_STATUS_WAIT:
                    return None
            return Death(f"the engine process (pid {process.pid})", exit_description(process.exitcode))
        if isinstance(engine, EngineClient):
            return Death("the engine process", "closed this front-end's connection")
        return Death("the engine thread", "ended")

    return probe


async def first_death(probes: list[Probe], interval: float = POLL_SECONDS) -> Death:
    """Wait until one of `probes` reports; its Death."""
    while True:
        for probe in probes:
            death = probe()
            if death is not None:
                return death
        await asyncio.sleep(interval)
