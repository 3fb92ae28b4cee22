"""EngineProcess: the engine core in a child process; outputs and streams in this one.

With `AsyncEngine` the gRPC event loop and the engine share one interpreter: while the loop
turns a step's outputs into messages it holds the GIL the engine needs to schedule and
dispatch the next step, and on a GPU whose 1B decode step takes ~5 ms the service then
costs more than the model. Here the engine core runs in a process of its own and sends
each step's new token ids (`CoreOutputs`); detokenizing, stop strings and building outputs
run in the connected processes (`OutputProcessor`), as vLLM V1 splits its engine core from
its API servers. Over a pipe:

    parent -> child   ("add", call_id, AddRequest)
                      ("abort", rid) | ("stop_strings", [StopMatch, ...])
                      ("call", call_id, fn, args) | ("leave",) | ("stop",)
    child -> parent   ("ready", EngineInfo) | ("failed", message)      once, at start
                      ("reply", call_id, ok, value)                    per add / call
                      ("outputs", CoreOutputs)                         per step
                      ("step_failed", [rid, ...], message)
                      ("left",)                                        after "leave"

The child's loop is engine_child.py's. It reads and writes its ends through `ClientLink`
(client_link.py): without blocking the step loop, and the replies to one pass over the
commands, or one step's outputs, in one write per connection.

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
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from jaxengine.config import EngineConfig
from jaxengine.engine.async_engine import EngineDeadError, StreamingEngine, StreamItem
from jaxengine.engine.core_outputs import CoreOutputs
from jaxengine.engine.engine_child import AddRequest, EngineInfo, child_main
from jaxengine.engine.input_processor import InputProcessor, Prompt
from jaxengine.engine.output_processor import OutputProcessor
from jaxengine.outputs import OutputKind
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _Adding(NamedTuple):
    """An "add" in flight: what the client's output processor starts once the child accepts it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    arrival_time: float


class EngineClient(StreamingEngine):
    """`AsyncEngine`'s interface over one connection to an engine child process. Built from
    a connection the child was started with (`EngineProcess.client_connections`), in any
    process; the constructor waits for the child to be ready (or raises its error)."""

    def __init__(self, conn: Connection):
        super().__init__()
        self._conn = conn
        try:
            kind, value = conn.recv()
        except EOFError:
            raise EngineDeadError("the engine process exited while loading the model") from None
        if kind == "failed":  # the load error itself (its type and message name what is wrong)
            raise value
        self.engine: EngineInfo = value
        self._send_lock = threading.Lock()
        self._calls = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._adding: dict[int, _Adding] = {}  # call id of an "add" -> the request, for the processor
        info = self.engine
        self.input_processor = InputProcessor(tokenizer=info.tokenizer, vocab_size=info.model_config.vocab_size,
                                              max_model_len=info.max_model_len, max_n=info.config.max_n)
        self.processor = OutputProcessor(info.tokenizer)  # used on the reader thread only
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="jaxengine-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ commands

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _request(self, make_msg: Callable[[int], tuple]) -> concurrent.futures.Future:
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

    def _submit(self, prompt: Prompt, params: SamplingParams | None, rid: str, kind: OutputKind,
                priority: int) -> concurrent.futures.Future:
        params = params or SamplingParams()
        try:
            text, ids = self.input_processor.prompt_token_ids(prompt)  # tokenized here, not in the engine
        except (TypeError, ValueError) as e:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(e)
            return fut
        arrival = time.monotonic()

        def message(cid: int) -> tuple:
            self._adding[cid] = _Adding(rid, text, ids, params, kind, arrival)  # the reader adds it on "reply"
            return ("add", cid, AddRequest(ids, params, rid, priority, arrival))

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

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self._request(lambda cid: ("call", cid, fn, args))

    @property
    def is_dead(self) -> bool:
        return self._dead

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
                        self.processor.add(adding.request_id, adding.prompt, adding.prompt_token_ids, adding.params,
                                           adding.kind, adding.arrival_time)
                    except Exception as e:  # noqa: BLE001 - the caller gets it; the engine drops the request
                        log.exception("starting the outputs of %s failed", adding.request_id)
                        self.abort(adding.request_id)
                        ok, value = False, e
                fut = self._pending.pop(cid, None)
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_result(value) if ok else fut.set_exception(value)
            elif kind == "step_failed":
                _, rids, message = msg
                self.processor.remove(rids)
                self._send_all([StreamItem(rid, EngineDeadError(f"engine step failed: {message}"), 0, True)
                                for rid in rids])
        self._dead = True
        for fut in list(self._pending.values()):
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError("the engine process has exited"))
        self._pending.clear()
        self._send_all([StreamItem(rid, EngineDeadError("engine shut down"), 0, True) for rid in list(self._streams)])

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
            self._send_all([StreamItem(rid, EngineDeadError(f"building this request's output failed: {e!r}"), 0, True)
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
        self._process = ctx.Process(target=child_main, args=(config, [c for _, c in pipes], progress),
                                    name="jaxengine-engine", daemon=True)
        self._process.start()
        for _, child_end in pipes:
            child_end.close()
        self.client_connections = [ours for ours, _ in pipes[1:]]
        try:
            super().__init__(pipes[0][0])
        except EngineDeadError as e:  # died without a word: say how it ended
            self._process.join(5)
            code = self._process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise EngineDeadError(f"{e} ({how})") from None
        except BaseException:
            self._process.join(5)
            raise

    @property
    def process(self) -> multiprocessing.process.BaseProcess:
        """The engine child: its pid, and its exit code once it has ended."""
        return self._process

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._send_if_alive(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._reader.join(timeout)
        for conn in self.client_connections + [self._conn]:
            conn.close()
