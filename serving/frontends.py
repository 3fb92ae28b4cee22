"""More front-end processes on the server's ports, gRPC and HTTP (`jaxengine serve
--api-server-count N`).

One `grpc.aio` process carries ~10-13 k streamed messages/s (measured on an H200 host),
about a quarter of what a 1B model on an H200 produces; one uvicorn process's SSE fewer. As
vLLM does with `--api-server-count`, the server then runs N front-ends over the one engine
process:

    client ─┐                 ┌─ serving process (front-end 0, metrics, signals) ─┐
    client ─┼─ port (SO_REUSEPORT) ─ front-end 1 ... N-1 (processes) ─────────────┼─ engine process
    client ─┘   the kernel spreads connections over the N listeners               ┘

Each front-end is a whole `EngineServer` with an `EngineClient` on its own connection to
the engine (`EngineProcess.client_connections`). The serving process keeps what must be
one: the metrics endpoint (it sums the front-ends' per-request metrics at scrape time; a
front-end's HTTP /metrics fetches that sum from it),
the signals (it forwards SIGTERM, each front-end drains its own calls) and the engine's
life. A Ctrl-C reaches only the serving process's handler: front-ends ignore SIGINT.

Each is also one of the processes the server cannot do without (serving/watchdog.py): when
one dies, or the engine does, the serving process tells the others to fail (`fail`: health
NOT_SERVING, their calls UNAVAILABLE, exit 1); a front-end that loses its engine connection,
or the serving process, fails by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time

from jaxengine.engine.engine_process import EngineClient
from serving import event_loop
from serving.metrics import MetricFamilies
from serving.server import EngineServer, ServeOptions
from serving.watchdog import Probe, engine_probe, first_death, process_probe


class FrontendProcesses:
    """`count` front-end processes serving `options.port` (which must be bound with
    reuse_port by the caller first), one per engine connection in `connections`."""

    def __init__(self, options: ServeOptions, connections: list, timeout: float = 120.0):
        ctx = multiprocessing.get_context("spawn")
        # The metrics endpoint is the serving process's alone; the HTTP API (on `options.http_port`,
        # which the serving process bound with reuse_port) answers /metrics from it.
        opts = dataclasses.replace(options, reuse_port=True, metrics_port=None)
        self._controls, self._procs = [], []
        self._lock = threading.Lock()  # the metrics HTTP server scrapes from its threads
        for i, conn in enumerate(connections, start=1):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_frontend_main, args=(opts, conn, theirs), name=f"jaxengine-frontend-{i}",
                               daemon=True)
            proc.start()
            theirs.close()
            conn.close()  # the child has its copy; ours would hide the child's exit from the engine
            self._controls.append(ours)
            self._procs.append(proc)
        deadline = time.monotonic() + timeout
        for i, (control, proc) in enumerate(zip(self._controls, self._procs), start=1):
            if not control.poll(max(0.0, deadline - time.monotonic())):
                self.terminate()
                raise RuntimeError(f"front-end {i} did not start within {timeout:g}s")
            try:
                state = control.recv()
            except EOFError:
                proc.join(5)
                state = ("failed", f"exited with code {proc.exitcode}")
            if state[0] != "serving":
                self.terminate()
                raise RuntimeError(f"front-end {i} failed to start: {state[1]}")

    def __len__(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def probes(self) -> list[Probe]:
        """One watchdog probe per front-end: each must stay alive while the server serves."""
        return [process_probe(f"front-end process {i}", p) for i, p in enumerate(self._procs, start=1)]

    def fail(self, reason: str) -> None:
        """Tell each live front-end that the server is failing (`reason`): it turns health
        NOT_SERVING, ends its calls UNAVAILABLE and exits 1."""
        with self._lock:
            for control in self._controls:
                try:
                    control.send(("fail", reason))
                except (EOFError, OSError):  # that one has exited already
                    pass

    def metrics(self) -> list[MetricFamilies]:
        """Each live front-end's per-request metrics (for `ServingMetrics.add_source`)."""
        out = []
        with self._lock:
            for control in self._controls:
                try:
                    control.send("metrics")
                    if control.poll(5.0):
                        out.append(control.recv())
                except (EOFError, OSError):  # that front-end has exited
                    pass
        return out

    def terminate(self) -> None:
        """SIGTERM to each: stop taking calls and drain (a second one skips the wait)."""
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def join(self, timeout: float) -> list[int | None]:
        """Wait for them to exit; kill what is left. Their exit codes."""
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for control in self._controls:
            control.close()
        return [p.exitcode for p in self._procs]


def _frontend_main(options, engine_conn, control) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serving process turns Ctrl-C into SIGTERM
    raise SystemExit(event_loop.run(_frontend(options, engine_conn, control), options.loop))


async def _frontend(options: ServeOptions, engine_conn, control) -> int:
    server = EngineServer(options)
    try:
        await server.start()
        engine = await asyncio.to_thread(EngineClient, engine_conn)
    except (OSError, RuntimeError) as e:
        control.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    await server.set_engine(engine)
    loop, stop, failed = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
    reasons: list[str] = []

    def on_sigterm() -> None:
        if stop.is_set():
            server.skip_drain_wait()
        stop.set()

    def on_fail(reason: str) -> None:  # from the control thread
        def fail() -> None:
            reasons.append(reason)
            failed.set()

        try:
            loop.call_soon_threadsafe(fail)
        except RuntimeError:  # the loop has closed: this front-end is done anyway
            pass

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    control.send(("serving", server.port))
    threading.Thread(target=_answer_control, args=(control, server.metrics, on_fail), name="jaxengine-control",
                     daemon=True).start()
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, failed)]
    death = asyncio.ensure_future(first_death([engine_probe(engine)]))
    await asyncio.wait([*waits, death], return_when=asyncio.FIRST_COMPLETED)
    for task in (*waits, death):
        task.cancel()
    if stop.is_set():
        await server.drain()  # and leave the engine, which goes on for the others
        return 0
    reason = str(death.result()) if death.done() and not death.cancelled() else reasons[0]
    print(f"jaxengine: front-end process {os.getpid()}: {reason}; failing its calls and exiting",
          file=sys.stderr, flush=True)
    await server.fail(reason)
    await asyncio.to_thread(engine.shutdown, 5.0)
    return 1


def _answer_control(control, metrics, on_fail) -> None:
    """The serving process's requests: "metrics" (answered with this process's per-request
    metrics) or ("fail", reason). Its end closing means it is gone: this front-end fails too."""
    while True:
        try:
            msg = control.recv()
        except (EOFError, OSError):
            on_fail("the serving process exited")
            return
        if isinstance(msg, tuple) and msg[0] == "fail":
            on_fail(msg[1])
            continue
        try:
            control.send(metrics.request_families())
        except (EOFError, OSError):
            on_fail("the serving process exited")
            return
