"""EngineProcess: the engine core in a child process; outputs and streams in this one.

With `AsyncEngine` the gRPC event loop and the engine share one interpreter: while the loop
turns a step's outputs into messages it holds the GIL the engine needs to schedule and
dispatch the next step, and on a GPU whose 1B decode step takes ~5 ms the service then
costs more than the model (benchmarks/RESULTS.md, Serving). Here the engine core runs in a
process of its own and sends each step's new token ids (`CoreOutputs`); detokenizing, stop
strings and building outputs run in the connected processes (`OutputProcessor`), as vLLM
V1 splits its engine core from its API servers. Over a pipe:

    parent -> child   ("add", call_id, (prompt_token_ids, params, rid, priority, arrival_time))
                      ("abort", rid) | ("stop_strings", [(sample id, stop), ...])
                      ("call", call_id, fn, args) | ("leave",) | ("stop",)
    child -> parent   ("ready", EngineInfo) | ("failed", message)      once, at start
                      ("reply", call_id, ok, value)                    per add / call
                      ("outputs", CoreOutputs)                         per step
                      ("step_failed", [rid, ...], message)
                      ("left",)                                        after "leave"

The child reads and writes its ends through `ClientLink` (client_link.py): without blocking
the step loop, and the replies to one pass over the commands, or one step's outputs, in one
write per connection.

The child can serve several such connections (`num_clients`): one per gRPC front-end
process (`jaxengine serve --api-server-count N`, vLLM's API-server scale-out). Each
connection's requests and outputs are its own; `EngineClient` is one connection's end, and
`EngineProcess` (connection 0) also owns the child. A client that goes away has its
requests aborted; "stop" is connection 0's alone. Text prompts are tokenized by the client
(with the tokenizer in EngineInfo).

`call(fn, *args)` runs `fn(engine, *args)` in the child, so `fn` must be picklable (a
module-level function). The child is started with "spawn": a script that creates an
EngineProcess needs the usual `if __name__ == "__main__":` guard. Single host only: a
multi-host engine joins JAX's distributed runtime in the serving process
(`jaxengine serve --coordinator-address`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import selectors
import threading
import time
from typing import Any

from jaxengine.engine.async_engine import EngineDeadError, StreamingEngine
from jaxengine.engine.client_link import ClientLink
from jaxengine.config import EngineConfig
from jaxengine.engine.core import CoreOutputs
from jaxengine.engine.output_processor import OutputProcessor
from jaxengine.outputs import OutputKind
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineInfo:
    """What the server reads of the engine without a round trip (GetModelInfo, limits)."""

    model_config: Any
    config: EngineConfig
    max_model_len: int
    dtype: Any
    kv_dtype: Any
    num_blocks: int
    tokenizer: Any  # a copy: clients tokenize text prompts and detokenize outputs with it

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        return cls(engine.model_config, engine.config, engine.max_model_len, engine.dtype, engine.kv_dtype,
                   engine.num_blocks, engine.tokenizer)


class EngineClient(StreamingEngine):
    """`AsyncEngine`'s interface over one connection to an engine child process. Built from
    a connection the child was started with (`EngineProcess.client_connections`), in any
    process; the constructor waits for the child to be ready (or raises its error)."""

    def __init__(self, conn):
        super().__init__()
        self._conn = conn
        try:
            kind, value = conn.recv()
        except EOFError:
            raise RuntimeError("the engine process exited while loading") from None
        if kind == "failed":
            raise RuntimeError(f"the engine process could not load the model: {value}")
        self.engine: EngineInfo = value
        self._send_lock = threading.Lock()
        self._calls = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._adding: dict[int, tuple] = {}  # call id of an "add" -> the request, for the processor
        self.processor = OutputProcessor(self.engine.tokenizer)  # used on the reader thread only
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="jaxengine-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ commands

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _request(self, make_msg) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._dead:
            fut.set_exception(EngineDeadError("the engine process has exited"))
            return fut
        cid = next(self._calls)
        self._pending[cid] = fut
        try:
            self._send(make_msg(cid))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            self._pending.pop(cid, None)
            self._adding.pop(cid, None)
            fut.set_exception(TypeError(f"cannot send this to the engine process (use a module-level function "
                                        f"and picklable arguments): {e}"))
        except OSError as e:
            self._pending.pop(cid, None)
            self._adding.pop(cid, None)
            fut.set_exception(EngineDeadError(f"the engine process is gone: {e}"))
        return fut

    def _submit(self, prompt, params, rid: str, kind: OutputKind, priority: int) -> concurrent.futures.Future:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            tokenizer = self.engine.tokenizer
            if tokenizer is None:
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_exception(ValueError("this model has no tokenizer: pass prompt_token_ids instead of text"))
                return fut
            text, ids = prompt, tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt or [])
        arrival = time.monotonic()

        def message(cid: int) -> tuple:
            self._adding[cid] = (rid, text, ids, params, kind, arrival)  # the reader adds it on "reply"
            return ("add", cid, (ids, params, rid, priority, arrival))

        fut = self._request(message)
        # The child adds it even if the caller gives up first: abort it (the add is ahead in the pipe).
        fut.add_done_callback(lambda f: f.cancelled() and self.abort(rid))
        return fut

    def _send_if_alive(self, msg: tuple) -> None:
        """Send a message nobody waits on a reply to; nothing if the child is gone."""
        if not self._dead:
            try:
                self._send(msg)
            except OSError:
                pass

    def abort(self, request_id: str) -> None:
        self._send_if_alive(("abort", request_id))

    def call(self, fn, *args) -> concurrent.futures.Future:
        return self._request(lambda cid: ("call", cid, fn, args))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Leave the engine (which aborts what this connection still runs); it goes on for
        its other clients. `EngineProcess.shutdown` stops it."""
        self._send_if_alive(("leave",))  # answered with "left", which ends the reader
        self._reader.join(timeout)
        self._conn.close()

    # ------------------------------------------------------------------ replies and outputs

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "left":
                break
            if kind == "outputs":
                self._outputs(msg[1])
            elif kind == "reply":
                _, cid, ok, value = msg
                adding = self._adding.pop(cid, None)
                if ok and adding is not None:
                    try:
                        self.processor.add(*adding)
                    except Exception as e:  # noqa: BLE001 - the caller gets it; the engine drops the request
                        log.exception("starting the outputs of %s failed", adding[0])
                        self.abort(adding[0])
                        ok, value = False, e
                fut = self._pending.pop(cid, None)
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_result(value) if ok else fut.set_exception(value)
            elif kind == "step_failed":
                _, rids, message = msg
                self.processor.remove(rids)
                self._send_all([(rid, EngineDeadError(f"engine step failed: {message}"), 0, True) for rid in rids])
        self._dead = True
        for fut in list(self._pending.values()):
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError("the engine process has exited"))
        self._pending.clear()
        self._send_all([(rid, EngineDeadError("engine shut down"), 0, True) for rid in list(self._streams)])

    def _outputs(self, out: CoreOutputs) -> None:
        """A step's token ids -> outputs to their streams (on the reader thread). Should
        turning them into outputs fail, the requests of that step fail (their callers get
        the error, the engine aborts them) and the reader goes on: no stream is left hanging."""
        try:
            records, stops = self.processor.process(out)
        except Exception as e:  # noqa: BLE001 - a bug here must not end every stream
            log.exception("building outputs failed")
            rids = self.processor.request_ids_of([*out.req_ids, *out.finished])
            self.processor.remove(rids)
            for rid in rids:
                self.abort(rid)
            self._send_all([(rid, EngineDeadError(f"building this request's output failed: {e!r}"), 0, True)
                            for rid in rids])
            return
        if stops:
            self._send_if_alive(("stop_strings", stops))
        self._send_records(records)


class EngineProcess(EngineClient):
    """Starts the engine child (load and compile there) and is its connection 0. With
    `num_clients` > 1 the child also serves `client_connections` (hand each to the process
    that builds an `EngineClient` on it, e.g. by passing it to a spawned Process)."""

    def __init__(self, config: EngineConfig, *, progress: bool = True, num_clients: int = 1):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited JAX state
        pipes = [ctx.Pipe() for _ in range(num_clients)]
        self._process = ctx.Process(target=_child_main, args=(config, [c for _, c in pipes], progress),
                                    name="jaxengine-engine", daemon=True)
        self._process.start()
        for _, child_end in pipes:
            child_end.close()
        self.client_connections = [ours for ours, _ in pipes[1:]]
        try:
            super().__init__(pipes[0][0])
        except RuntimeError as e:
            self._process.join(5)
            raise RuntimeError(f"{e} (exit code {self._process.exitcode})") from None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._send_if_alive(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._reader.join(timeout)
        for conn in self.client_connections + [self._conn]:
            conn.close()


# ---------------------------------------------------------------------- the child process

def _picklable_error(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - some exceptions carry unpicklable state
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(config: EngineConfig, conns: list, progress: bool) -> None:
    import signal

    from jaxengine.engine.data_parallel import make_engine

    # Ctrl-C and a SIGTERM to the process group are the parent's to handle: it drains, then
    # stops this process. A parent that dies leaves EOF on the pipe, which ends the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        engine = make_engine(config, progress=progress)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        for conn in conns:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    info = EngineInfo.of(engine)
    for conn in conns:
        conn.send(("ready", info))
    clients = _Clients(engine, conns)
    # The loop's time beside the steps (a dict beside the engine's own `timing`, which a
    # DataParallelEngine lacks): what serving costs the engine process per step; and when
    # the last busy spell started and ended (time.perf_counter()).
    timing = getattr(engine, "timing", None)
    timing = timing if isinstance(timing, dict) else {}
    timing.update(commands_seconds=0.0, outputs_seconds=0.0)
    clock = time.perf_counter
    try:
        while True:
            t0, busy = clock(), engine.has_unfinished_requests()
            stop = clients.handle_commands(wait=not busy)
            if busy:  # not the wait for work when idle
                timing["commands_seconds"] += clock() - t0
            if stop:
                break
            if not engine.has_unfinished_requests():
                continue
            if not busy:  # a busy spell starts: its first request is in
                timing["busy_start"] = clock()
            try:
                out = engine.step_core()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                clients.fail_all(repr(e))
                continue
            if out:
                t0 = clock()
                clients.outputs(out)
                timing["outputs_seconds"] += clock() - t0
            if not engine.has_unfinished_requests():  # ... and ends: the last outputs are sent
                timing["busy_end"] = clock()
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        clients.close()
        close = getattr(engine, "close", None)
        if close is not None:
            close()


class _Clients:
    """The child's connections: their commands, and each step's outputs to the connection
    whose request they are. Replies to one pass over the commands, and a step's outputs,
    leave in one write per connection (`ClientLink`)."""

    def __init__(self, engine, conns: list):
        self.engine = engine
        self.links = [ClientLink(c) for c in conns]
        self.live = dict(enumerate(self.links))  # still connected
        self.selector = selectors.DefaultSelector()
        for i, link in self.live.items():
            self.selector.register(link.sock, selectors.EVENT_READ, i)
        # Requests (ids as added, and their samples' ids) not yet finished -> their connection.
        self.owner: dict[str, int] = {}

    def handle_commands(self, wait: bool) -> bool:
        """Run every command waiting (`wait`: the engine is idle, block briefly for one);
        True on stop."""
        timeout = 0.5 if wait else 0.0
        try:
            while ready := self.selector.select(timeout):
                timeout = 0.0
                for key, _ in ready:
                    i = key.data
                    msgs, closed = self.links[i].read()
                    for msg in msgs:
                        if self._handle(i, msg):
                            return True
                        if i not in self.live:
                            break
                    if closed and i in self.live:
                        if i == 0:
                            raise EOFError("the engine's owner is gone")
                        self._client_gone(i)
        finally:
            for link in self.links:
                link.flush()
        return False

    def _handle(self, i: int, msg: tuple) -> bool:
        engine, kind = self.engine, msg[0]
        if kind == "stop" and i == 0:
            if self.owner:
                engine.abort_request(sorted(self.owner))
                engine.step_core()
            return True
        if kind == "leave":
            self._client_gone(i)
            self.links[i].send(("left",))
            return False
        if kind == "abort":
            if self.owner.get(msg[1]) == i:
                engine.abort_request(msg[1])
            return False
        if kind == "stop_strings":
            engine.stop_requests([(sid, stop) for sid, stop in msg[1] if self.owner.get(sid) == i])
            return False
        cid = msg[1]
        try:
            if kind == "add":
                ids, params, rid, prio, arrival = msg[2]
                samples = engine.add_core_request(ids, params, request_id=rid, priority=prio, arrival_time=arrival)
                for r in (rid, *samples):
                    self.owner[r] = i
                value = rid
            else:  # "call"
                value = msg[2](engine, *msg[3])
            self.links[i].send(("reply", cid, True, value))  # a result that cannot be pickled raises here
        except Exception as e:  # noqa: BLE001 - the caller gets it, the engine goes on
            self.links[i].send(("reply", cid, False, _picklable_error(e)))
        return False

    def _client_gone(self, i: int) -> None:
        if self.live.pop(i, None) is None:
            return
        self.selector.unregister(self.links[i].sock)
        rids = sorted(r for r, k in self.owner.items() if k == i)
        if rids:
            self.engine.abort_request(rids)  # their final outputs go nowhere
            log.warning("engine client %d left; aborted its %d requests", i, len(rids))

    def outputs(self, out: CoreOutputs) -> None:
        parts = {0: out} if len(self.links) == 1 else out.split(self.owner)
        for rid in (*out.finished, *out.done):
            self.owner.pop(rid, None)
        for i, part in parts.items():
            if i in self.live:
                self.links[i].send(("outputs", part))
                self.links[i].flush()

    def fail_all(self, message: str) -> None:
        rids = sorted(self.owner)
        self.engine.abort_request(rids)
        self.engine.step_core()
        for i, link in self.live.items():
            mine = [r for r in rids if self.owner[r] == i]
            if mine:
                link.send(("step_failed", mine, message))
                link.flush()
        self.owner.clear()

    def close(self) -> None:
        self.selector.close()
        for link in self.links:
            link.close()
