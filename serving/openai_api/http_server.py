"""`HttpServer`: uvicorn serving the OpenAI app on the caller's asyncio loop (the one the
grpc.aio server runs on), started and stopped with `EngineServer`.

The socket is bound first (`bind`, synchronous: a busy port fails start-up with an OSError
naming it, and port 0 reports the port it got), then served. uvicorn's own signal handling
is off: `serving.launch.serve` owns SIGTERM/SIGINT and drains both protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from serving.openai_api.app import build_app
from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.options import HttpOptions
from serving.servicer import EngineServicer

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the launcher's handlers stay in place
        yield


class HttpServer:
    def __init__(self, servicer: EngineServicer, options: HttpOptions):
        self.options = options
        self.app = build_app(EngineGate(servicer, options))
        self._sock: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    def bind(self) -> int:
        host, port = self.options.host, self.options.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.options.reuse_port:  # the front-end processes' listeners on one port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve the HTTP API on {host}:{port} (--http-port): {e.strerror or e}") from None
        self._sock = sock
        self.port = sock.getsockname()[1]
        return self.port

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, timeout_keep_alive=5)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():  # failed to start: its exception, or a plain error
            self._task.result()
            raise OSError(f"the HTTP server on {self.options.host}:{self.port} stopped at start-up")

    async def stop(self, timeout: float = 10.0) -> None:
        """Close the port, let open responses finish (up to uvicorn's graceful timeout), stop."""
        if self._task is None:
            self.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - stopping anyway
            log.warning("the HTTP server did not stop cleanly (%s); forcing it", type(e).__name__)
            self._server.force_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 5)
        self._task = None
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
