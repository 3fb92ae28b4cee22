"""The gRPC server: `grpc.aio` in front of the engine's streams (`AsyncEngine`, or with
`--engine-process` an `EngineProcess`), with health, reflection, metrics,
API keys, TLS and a graceful drain.

    jaxengine serve --model DIR [--host 127.0.0.1] [--port 50051] [--api-key KEY] ...

Life cycle (`serve`): bind the port with health NOT_SERVING, load and compile the model on a
thread (the event loop keeps answering health checks meanwhile), switch health to SERVING
and print where it listens. On SIGTERM/SIGINT: health NOT_SERVING, new calls UNAVAILABLE,
in-flight calls get `drain_timeout` seconds to finish, then the rest are aborted (they end
with finish reason ABORT), the server stops and the process exits 0. A second signal skips
the wait.

`BackgroundServer` runs the same server on its own thread and event loop around an existing
`AsyncEngine` or `EngineProcess` (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxengine.engine.async_engine import AsyncEngine, StreamingEngine
from jaxengine.config import EngineConfig
from serving.auth import ApiKeyInterceptor
from serving.metrics import ServingMetrics
from serving.servicer import SERVICE_NAME, EngineServicer, add_to_server

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclasses.dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    model_name: str = ""
    api_keys: tuple[str, ...] = ()
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    max_queue: int | None = None  # None: unbounded
    drain_timeout: float = 30.0
    # Let other front-end processes listen on this port too (serving/frontends.py). Off by
    # default: a second server on a busy port must fail, not share it silently.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: pass both or neither")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _engine_stats(engine) -> dict:  # runs on the engine (thread or process)
    return engine.stats()


class EngineServer:
    def __init__(self, options: ServeOptions):
        self.options = options
        self.metrics = ServingMetrics(options.model_name, self._stats)
        self.servicer = EngineServicer(options.model_name, max_queue=options.max_queue, metrics=self.metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._skip_drain_wait = asyncio.Event()

    @property
    def engine(self) -> StreamingEngine | None:
        return self.servicer.engine

    def _stats(self) -> dict | None:
        engine = self.servicer.engine
        if engine is None:
            return None
        return engine.call(_engine_stats).result(timeout=10)

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until `set_engine`); returns the port."""
        opts = self.options
        interceptors = [ApiKeyInterceptor(opts.api_keys)] if opts.api_keys else []
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", int(opts.reuse_port))])
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if opts.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())])
                self.port = server.add_secure_port(opts.address, creds)
            else:
                self.port = server.add_insecure_port(opts.address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {opts.address}: {e} (is the port in use?)") from None
        await server.start()
        self.server = server
        if opts.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(opts.metrics_port, opts.host)
        return self.port

    async def set_engine(self, engine: StreamingEngine) -> None:
        self.servicer.engine = engine
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def skip_drain_wait(self) -> None:
        self._skip_drain_wait.set()

    async def drain(self, timeout: float | None = None, *, shutdown_engine: bool = True) -> int:
        """Stop taking calls, give in-flight calls `timeout` seconds, abort the rest, stop.
        Returns how many requests had to be aborted."""
        timeout = self.options.drain_timeout if timeout is None else timeout
        s, loop = self.servicer, asyncio.get_running_loop()
        s.draining = True
        await self.health.enter_graceful_shutdown()
        deadline = loop.time() + timeout
        while s.active and loop.time() < deadline and not self._skip_drain_wait.is_set():
            await asyncio.sleep(0.02)
        aborted = len(s.active)
        if aborted and s.engine is not None:
            log.warning("aborting %d requests still running at shutdown", aborted)
            for rid in list(s.active):
                s.engine.abort(rid)
            end = loop.time() + 10.0  # aborted requests finish within a step
            while s.active and loop.time() < end:
                await asyncio.sleep(0.02)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        self.metrics.close()
        if shutdown_engine and s.engine is not None:
            await asyncio.to_thread(s.engine.shutdown)
        return aborted


def _load_in_thread(config: EngineConfig, progress: bool, engine_process: bool,
                    num_clients: int = 1) -> tuple[asyncio.Future, threading.Thread]:
    """Build the engine (load + compile) on a daemon thread; the loop stays responsive."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def work():
        try:
            if engine_process:
                from jaxengine.engine.engine_process import EngineProcess

                result = EngineProcess(config, progress=progress, num_clients=num_clients)
            else:
                from jaxengine.engine.data_parallel import make_engine

                result = AsyncEngine(make_engine(config, progress=progress))
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            # Bound now: Python unbinds `e` when the except block ends, before the loop runs this.
            loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    thread = threading.Thread(target=work, name="jaxengine-load", daemon=True)
    thread.start()
    return fut, thread


async def serve(options: ServeOptions, config: EngineConfig, *, progress: bool = True, engine_process: bool = False,
                api_server_count: int = 1) -> int:
    """Run a server until SIGTERM/SIGINT; returns the exit code. `engine_process`: run the
    engine in a child process (`EngineProcess`) instead of a thread of this one;
    `api_server_count` > 1 (needs it): that many front-end processes share the port
    (serving/frontends.py)."""
    if api_server_count < 1 or (api_server_count > 1 and not engine_process):
        raise ValueError(f"api_server_count must be 1, or more with the engine in its own process; got {api_server_count}")
    if api_server_count > 1:
        options = dataclasses.replace(options, reuse_port=True)
    server = EngineServer(options)
    try:
        port = await server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scheme = "grpcs" if options.tls_cert else "grpc"
    print(f"jaxengine: loading {options.model_name} (health NOT_SERVING on {options.host}:{port} until ready)",
          file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    frontends = None  # the FrontendProcesses, once started

    def on_signal(signame: str):
        if stop.is_set():
            print(f"jaxengine: {signame} again: aborting in-flight requests now", file=sys.stderr, flush=True)
            server.skip_drain_wait()
        if frontends is not None:
            frontends.terminate()  # they drain (or, the second time, abort) their own calls
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        load, _thread = _load_in_thread(config, progress, engine_process, api_server_count)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():  # told to stop while loading: nothing is in flight
            print("jaxengine: stopped before the model was ready", file=sys.stderr, flush=True)
            await server.drain(0)
            return 0
        if load.exception() is not None:
            e = load.exception()
            print(f"error: could not load the model: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            await server.drain(0)
            return 1
        engine = load.result()
        if api_server_count > 1:
            from serving.frontends import FrontendProcesses

            try:
                frontends = await asyncio.to_thread(FrontendProcesses, dataclasses.replace(options, port=port),
                                                    engine.client_connections)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                await server.drain(0)
                return 1
            server.metrics.add_source(frontends.metrics)
            if stop.is_set():
                frontends.terminate()
        await server.set_engine(engine)
        extra = f", metrics on http://{options.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        extra += f", {api_server_count} front-end processes" if api_server_count > 1 else ""
        print(f"jaxengine: serving {options.model_name} ({SERVICE_NAME}) on {scheme}://{options.host}:{port}{extra}",
              flush=True)
        await stopper
        print(f"jaxengine: draining (up to {options.drain_timeout:g}s for in-flight requests)", file=sys.stderr, flush=True)
        aborted = await server.drain(shutdown_engine=frontends is None)
        if frontends is not None:
            codes = await asyncio.to_thread(frontends.join, options.drain_timeout + 30)
            if any(codes):
                print(f"jaxengine: front-end exit codes {codes}", file=sys.stderr, flush=True)
            await asyncio.to_thread(engine.shutdown)
        print(f"jaxengine: stopped ({aborted} requests aborted)", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class BackgroundServer:
    """An `EngineServer` on its own thread and event loop, around an existing AsyncEngine
    (or none yet: health stays NOT_SERVING until `set_engine`)."""

    def __init__(self, engine: StreamingEngine | None, options: ServeOptions | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jaxengine-grpc", daemon=True)
        self.thread.start()
        self.options = options or ServeOptions(port=0)
        self.server = self.run(self._make())
        self.port = self.run(self.server.start())
        if engine is not None:
            self.set_engine(engine)

    async def _make(self) -> EngineServer:
        return EngineServer(self.options)  # built on the loop: its asyncio objects belong there

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    def run(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_engine(self, engine: StreamingEngine) -> None:
        self.run(self.server.set_engine(engine))

    def close(self, drain_timeout: float = 5.0, *, shutdown_engine: bool = False) -> int:
        try:
            return self.run(self.server.drain(drain_timeout, shutdown_engine=shutdown_engine), timeout=drain_timeout + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
