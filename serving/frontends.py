"""More gRPC front-end processes on the server's port (`jaxengine serve --api-server-count N`).

One `grpc.aio` process carries ~10-13 k streamed messages/s (benchmarks/RESULTS.md,
Serving), about a quarter of what a 1B model on an H200 produces. As vLLM does with
`--api-server-count`, the server then runs N front-ends over the one engine process:

    client ─┐                 ┌─ serving process (front-end 0, metrics, signals) ─┐
    client ─┼─ port (SO_REUSEPORT) ─ front-end 1 ... N-1 (processes) ─────────────┼─ engine process
    client ─┘   the kernel spreads connections over the N listeners               ┘

Each front-end is a whole `EngineServer` with an `EngineClient` on its own connection to
the engine (`EngineProcess.client_connections`). The serving process keeps what must be
one: the metrics endpoint (it sums the front-ends' per-request metrics at scrape time),
the signals (it forwards SIGTERM, each front-end drains its own calls) and the engine's
life. A Ctrl-C reaches only the serving process's handler: front-ends ignore SIGINT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import threading
import time

from serving.metrics import MetricFamilies


class FrontendProcesses:
    """`count` front-end processes serving `options.port` (which must be bound with
    reuse_port by the caller first), one per engine connection in `connections`."""

    def __init__(self, options, connections: list, timeout: float = 120.0):
        ctx = multiprocessing.get_context("spawn")
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
    raise SystemExit(asyncio.run(_frontend(options, engine_conn, control)))


async def _frontend(options, engine_conn, control) -> int:
    from jaxengine.engine.engine_process import EngineClient
    from serving.server import EngineServer

    server = EngineServer(options)
    try:
        await server.start()
        engine = await asyncio.to_thread(EngineClient, engine_conn)
    except (OSError, RuntimeError) as e:
        control.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    await server.set_engine(engine)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()

    def on_sigterm() -> None:
        if stop.is_set():
            server.skip_drain_wait()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    control.send(("serving", server.port))
    threading.Thread(target=_answer_metrics, args=(control, server.metrics), name="jaxengine-metrics",
                     daemon=True).start()
    await stop.wait()
    await server.drain()  # and leave the engine, which goes on for the others
    return 0


def _answer_metrics(control, metrics) -> None:
    while True:
        try:
            control.recv()
            control.send(metrics.request_families())
        except (EOFError, OSError):
            return
