"""The gRPC server: `grpc.aio` in front of the engine's streams (`AsyncEngine`, or an
`EngineProcess` / `EngineClient`), with health, reflection, metrics, API keys, TLS, a graceful
drain (`drain`) and a loud failure (`fail`). With `http_port`, the OpenAI-compatible HTTP API
(serving/openai_api/) runs on the same event loop over the same servicer state: one engine,
one queue limit, and drain and fail end its requests too.

`EngineServer` binds the port with health NOT_SERVING and switches to SERVING at
`set_engine`; what `jaxengine serve` runs around it (loading, signals, front-end processes,
watching the engine) is `serving.launch.serve`. `BackgroundServer` runs the same server on its
own thread and event loop around an existing engine (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxengine.engine.async_engine import StreamingEngine
from serving.auth import ApiKeyInterceptor
from serving import event_loop
from serving.metrics import ServingMetrics
from serving.openai_api.options import HttpOptions
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
    # A Jinja chat template for chat requests, instead of the tokenizer's (--chat-template).
    chat_template: str | None = None
    # What a request's unset sampling fields take (the model's generation_config.json; vLLM's
    # --generation-config); SamplingParams' own defaults for fields not in it.
    sampling_defaults: dict = dataclasses.field(default_factory=dict)
    # Let other front-end processes listen on this port too (serving/frontends.py). Off by
    # default: a second server on a busy port must fail, not share it silently.
    reuse_port: bool = False
    # The OpenAI-compatible HTTP API (serving/openai_api/): None: off (`jaxengine serve`
    # defaults to 8000); 0: any free port. It binds `host` and takes `api_keys` too.
    http_port: int | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS origins; none: no CORS
    http_max_body_bytes: int = 16 << 20
    tool_call_parser: str | None = None  # --tool-call-parser NAME (serving/openai_api/tool_parsers)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" needs it, as in vLLM
    # A front-end process's HTTP /metrics: the serving process's metrics endpoint (serving/frontends.py).
    http_metrics_url: str | None = None
    loop: str = "auto"  # the event loop (serving/event_loop.py): auto takes uvloop where installed

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: pass both or neither")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port (--http-port) must be in [0, 65535], got {self.http_port}")
        event_loop.loop_factory(self.loop)  # an unknown name, or uvloop asked for and missing
        self.http_options()  # its checks (the tool-call parser's name, ...) now, not at start

    def http_options(self) -> HttpOptions:
        return HttpOptions(host=self.host, port=self.http_port or 0, model_name=self.model_name or "default",
                           api_keys=self.api_keys, allowed_origins=tuple(self.allowed_origins),
                           max_body_bytes=self.http_max_body_bytes, tool_call_parser=self.tool_call_parser,
                           enable_auto_tool_choice=self.enable_auto_tool_choice, reuse_port=self.reuse_port,
                           metrics_url=self.http_metrics_url)

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
        self.servicer = EngineServicer(options.model_name, max_queue=options.max_queue, metrics=self.metrics,
                                       chat_template=options.chat_template, sampling_defaults=options.sampling_defaults)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None  # serving.openai_api.http_server.HttpServer, with http_port
        self.http_port: int | None = None
        self._skip_drain_wait = asyncio.Event()

    @property
    def engine(self) -> StreamingEngine | None:
        return self.servicer.engine

    def _stats(self) -> dict | None:
        """The engine's gauges for a scrape; None (the per-request metrics alone) while loading,
        and when the engine cannot answer: a scrape must not fail because the engine did."""
        engine = self.servicer.engine
        if engine is None or engine.is_dead:
            return None
        try:
            return engine.call(_engine_stats).result(timeout=10)
        except Exception as e:  # noqa: BLE001 - dead, or too busy to answer in time
            log.warning("metrics: no engine stats this scrape (%s: %s)", type(e).__name__, e)
            return None

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until `set_engine`); returns the port.
        OSError, naming the address, when a port cannot be bound; nothing is left running then."""
        opts = self.options
        if opts.metrics_port is not None:  # first: a busy port fails before anything else runs
            try:
                self.metrics_port = self.metrics.serve_http(opts.metrics_port, opts.host)
            except OSError as e:
                raise OSError(f"cannot serve metrics on {opts.host}:{opts.metrics_port} (--metrics-port): "
                              f"{e.strerror or e}") from None
        try:
            if opts.http_port is not None:
                self.http_port = self._bind_http()
            self.server, self.port = await self._start_grpc()
            if self.http is not None:
                await self.http.start()
        except BaseException:
            self.metrics.close()
            if self.http is not None:
                self.http.close()
            if self.server is not None:
                await self.server.stop(grace=None)
            raise
        return self.port

    def _bind_http(self) -> int:
        # Imported here: a gRPC-only server (and every --api-server-count front-end) never
        # loads FastAPI and uvicorn.
        from serving.openai_api.http_server import HttpServer

        self.http = HttpServer(self.servicer, self.options.http_options())
        return self.http.bind()

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()

    async def _start_grpc(self) -> tuple[grpc.aio.Server, int]:
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
                port = server.add_secure_port(opts.address, creds)
            else:
                port = server.add_insecure_port(opts.address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {opts.address}: {e} (is the port in use?)") from None
        await server.start()
        return server, port

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
        await self._stop_http()
        self.metrics.close()
        if shutdown_engine and s.engine is not None:
            await asyncio.to_thread(s.engine.shutdown)
        return aborted

    async def fail(self, reason: str, *, linger: float = 2.0) -> None:
        """Something the server cannot serve without has died (`reason` names it): health
        NOT_SERVING now, new calls UNAVAILABLE, and every call in flight ends UNAVAILABLE
        (the engine cannot finish it; a client retries elsewhere). Health keeps answering
        NOT_SERVING for `linger` seconds, so health checkers see it before the port closes;
        then the server stops."""
        s, loop = self.servicer, asyncio.get_running_loop()
        s.failure = reason
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if s.engine is not None and not s.engine.is_dead:
            for rid in list(s.active):  # each call ends at its next output, which comes within a step
                s.engine.abort(rid)
        end = loop.time() + max(linger, 10.0)
        linger_end = loop.time() + linger
        while (s.active and loop.time() < end) or loop.time() < linger_end:
            await asyncio.sleep(0.02)
        if s.active:
            log.warning("%d calls still open after the failure; the server stops anyway", len(s.active))
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self._stop_http()
        self.metrics.close()


class BackgroundServer:
    """An `EngineServer` on its own thread and event loop, around an existing AsyncEngine
    (or none yet: health stays NOT_SERVING until `set_engine`)."""

    def __init__(self, engine: StreamingEngine | None, options: ServeOptions | None = None):
        self.options = options or ServeOptions(port=0)
        self.loop = event_loop.loop_factory(self.options.loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jaxengine-grpc", daemon=True)
        self.thread.start()
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
