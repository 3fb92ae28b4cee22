"""What `jaxengine serve` runs: an `EngineServer` around an engine it builds, until a signal
or a death ends it.

    jaxengine serve --model DIR [--host 127.0.0.1] [--port 50051] [--api-key KEY] ...

Life cycle (`serve`): bind the port (and the HTTP API's, serving/openai_api/, on the same
event loop) with health NOT_SERVING, load and compile the model on a thread (the event loop
keeps answering health checks meanwhile), start the front-end processes if asked
(serving/frontends.py), switch health to SERVING and print where it listens (the HTTP line
first, then the gRPC line, which scripts read as "ready"). Then one of two endings:

- SIGTERM/SIGINT: health NOT_SERVING (HTTP /health 503), new calls UNAVAILABLE (HTTP 503),
  in-flight calls of both get `drain_timeout` seconds to finish, then the rest are aborted
  (they end with finish reason ABORT), the servers stop and the process exits 0. A second
  signal skips the wait.
- the engine process (or thread) or a front-end process dies (serving/watchdog.py): a log
  line names it and how it ended, health turns NOT_SERVING (503) at once, in-flight calls end
  UNAVAILABLE (HTTP: 503, or an error event in a stream; `EngineServer.fail`), the other
  processes are stopped and the process exits 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import threading

from jaxengine.config import EngineConfig
from jaxengine.engine.async_engine import AsyncEngine
from jaxengine.engine.engine_process import EngineProcess
from serving.frontends import FrontendProcesses
from serving.server import EngineServer, ServeOptions
from serving.servicer import SERVICE_NAME
from serving.watchdog import engine_probe, first_death


def _say(message: str) -> None:
    print(f"jaxengine: {message}", file=sys.stderr, flush=True)


def _load_in_thread(config: EngineConfig, progress: bool, engine_process: bool,
                    num_clients: int = 1) -> asyncio.Future:
    """Build the engine (load + compile) on a daemon thread; the loop stays responsive."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def work():
        try:
            if engine_process:
                result = EngineProcess(config, progress=progress, num_clients=num_clients)
            else:
                from jaxengine.engine.data_parallel import make_engine

                result = AsyncEngine(make_engine(config, progress=progress))
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            # Bound now: Python unbinds `e` when the except block ends, before the loop runs this.
            loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=work, name="jaxengine-load", daemon=True).start()
    return fut


def _load_error(e: BaseException) -> str:
    # A load error's own message names the file and what is wrong (models.loading); other
    # errors keep their type, which is then part of what went wrong.
    if isinstance(e, (OSError, ValueError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def frontend_options(server: EngineServer) -> ServeOptions:
    """What the front-end processes serve: this server's bound ports (gRPC and HTTP, shared
    with reuse_port), with HTTP /metrics fetched from this process's metrics endpoint."""
    opts = server.options
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    metrics_url = f"http://{host}:{server.metrics_port}/metrics" if server.metrics_port is not None else None
    return dataclasses.replace(opts, port=server.port, http_port=server.http_port, http_metrics_url=metrics_url)


async def serve(options: ServeOptions, config: EngineConfig, *, progress: bool = True, engine_process: bool = False,
                api_server_count: int = 1) -> int:
    """Run a server until SIGTERM/SIGINT (exit code 0) or until the engine or a front-end
    process dies (1); returns the exit code. `engine_process`: run the engine in a child
    process (`EngineProcess`) instead of a thread of this one; `api_server_count` > 1 (needs
    it): that many front-end processes share the port (serving/frontends.py)."""
    if api_server_count < 1 or (api_server_count > 1 and not engine_process):
        raise ValueError(f"api_server_count must be 1, or more with the engine in its own process; got {api_server_count}")
    if api_server_count > 1:
        options = dataclasses.replace(options, reuse_port=True)
        if options.http_port is not None and options.metrics_port is None:
            # The front-ends' HTTP /metrics fetches the sum from the serving process's endpoint.
            options = dataclasses.replace(options, metrics_port=0)
    server = EngineServer(options)
    try:
        port = await server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scheme = "grpcs" if options.tls_cert else "grpc"
    http = f"; HTTP /health 503 on {options.host}:{server.http_port}" if server.http_port is not None else ""
    _say(f"loading {options.model_name} (health NOT_SERVING on {options.host}:{port} until ready{http})")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    frontends: FrontendProcesses | None = None

    def on_signal(signame: str):
        if stop.is_set():
            _say(f"{signame} again: aborting in-flight requests now")
            server.skip_drain_wait()
        if frontends is not None:
            frontends.terminate()  # they drain (or, the second time, abort) their own calls
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        load = _load_in_thread(config, progress, engine_process, api_server_count)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():  # told to stop while loading: nothing is in flight
            _say("stopped before the model was ready")
            await server.drain(0)
            return 0
        if load.exception() is not None:
            print(f"error: could not load the model: {_load_error(load.exception())}", file=sys.stderr, flush=True)
            await server.drain(0)
            return 1
        engine = load.result()
        if isinstance(engine, EngineProcess):
            _say(f"engine process pid {engine.process.pid}")
        if api_server_count > 1:
            try:
                frontends = await asyncio.to_thread(FrontendProcesses, frontend_options(server), engine.client_connections)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                await server.drain(0)
                await asyncio.to_thread(engine.shutdown)
                return 1
            server.metrics.add_source(frontends.metrics)
            _say(f"front-end process pids {', '.join(str(pid) for pid in frontends.pids)}")
            if stop.is_set():
                frontends.terminate()
        await server.set_engine(engine)
        extra = f", metrics on http://{options.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        extra += f", {api_server_count} front-end processes" if api_server_count > 1 else ""
        if server.http_port is not None:  # before the gRPC line, which tests and scripts read as "ready"
            print(f"jaxengine: serving {options.model_name} (OpenAI API) on http://{options.host}:{server.http_port}/v1",
                  flush=True)
        print(f"jaxengine: serving {options.model_name} ({SERVICE_NAME}) on {scheme}://{options.host}:{port}{extra}",
              flush=True)
        probes = [engine_probe(engine)] + (frontends.probes() if frontends is not None else [])
        death = asyncio.ensure_future(first_death(probes))
        await asyncio.wait([stopper, death], return_when=asyncio.FIRST_COMPLETED)
        if not death.done():
            death.cancel()
            return await _drain(server, engine, frontends, options)
        return await _fail(server, engine, frontends, str(death.result()))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _drain(server: EngineServer, engine, frontends: FrontendProcesses | None, options: ServeOptions) -> int:
    _say(f"draining (up to {options.drain_timeout:g}s for in-flight requests)")
    aborted = await server.drain(shutdown_engine=frontends is None)
    if frontends is not None:
        codes = await asyncio.to_thread(frontends.join, options.drain_timeout + 30)
        if any(codes):
            _say(f"front-end exit codes {codes}")
        await asyncio.to_thread(engine.shutdown)
    _say(f"stopped ({aborted} requests aborted)")
    return 0


async def _fail(server: EngineServer, engine, frontends: FrontendProcesses | None, reason: str) -> int:
    _say(f"{reason}; health NOT_SERVING, failing the calls in flight and exiting")
    if frontends is not None:
        frontends.fail(reason)  # each fails its own calls and exits
    await server.fail(reason)
    if frontends is not None:
        await asyncio.to_thread(frontends.join, 30)
    await asyncio.to_thread(engine.shutdown, 5.0)
    _say(f"stopped: {reason}")
    return 1
