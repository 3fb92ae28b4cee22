"""EngineProcess: the engine loop in a child process, streams in this one.

With `AsyncEngine` the gRPC event loop and the engine share one interpreter: while the loop
turns a step's outputs into messages it holds the GIL the engine needs to schedule and
dispatch the next step, and on a GPU whose 1B decode step takes ~5 ms the service then
costs more than the model (benchmarks/RESULTS.md, Serving). Here the engine runs in a
process of its own (as vLLM V1's engine core does) and talks to this one over a pipe:

    parent -> child   ("add", call_id, (prompt, params, rid, kind, priority))
                      ("abort", rid) | ("call", call_id, fn, args) | ("stop",)
    child -> parent   ("ready", EngineInfo) | ("failed", message)      once, at start
                      ("reply", call_id, ok, value)                    per add / call
                      ("outputs", [OutputRecord, ...])                 per step
                      ("step_failed", [rid, ...], message)

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
import queue
import threading
from typing import Any

from jaxengine.async_engine import EngineDeadError, StreamingEngine
from jaxengine.config import EngineConfig
from jaxengine.outputs import OutputKind, OutputRecord

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
    tokenizer: Any  # a copy, for `is None` and its chat template; tokenizing runs in the child

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        return cls(engine.model_config, engine.config, engine.max_model_len, engine.dtype, engine.kv_dtype,
                   engine.num_blocks, engine.tokenizer)


class EngineProcess(StreamingEngine):
    """`AsyncEngine`'s interface, with the engine loaded, compiled and stepped in a child
    process. The constructor returns once the child is ready (or raises its error)."""

    def __init__(self, config: EngineConfig, *, progress: bool = True):
        super().__init__()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited JAX state
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(config, child_conn, progress),
                                    name="jaxengine-engine", daemon=True)
        self._process.start()
        child_conn.close()
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode})") from None
        if kind == "failed":
            self._process.join(5)
            raise RuntimeError(f"the engine process could not load the model: {value}")
        self.engine: EngineInfo = value
        self._send_lock = threading.Lock()
        self._calls = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
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
            fut.set_exception(TypeError(f"cannot send this to the engine process (use a module-level function "
                                        f"and picklable arguments): {e}"))
        except OSError as e:
            self._pending.pop(cid, None)
            fut.set_exception(EngineDeadError(f"the engine process is gone: {e}"))
        return fut

    def _submit(self, prompt, params, rid: str, kind: OutputKind, priority: int) -> concurrent.futures.Future:
        fut = self._request(lambda cid: ("add", cid, (prompt, params, rid, kind, priority)))
        # The child adds it even if the caller gives up first: abort it (the add is ahead in the pipe).
        fut.add_done_callback(lambda f: f.cancelled() and self.abort(rid))
        return fut

    def abort(self, request_id: str) -> None:
        if not self._dead:
            try:
                self._send(("abort", request_id))
            except OSError:
                pass

    def call(self, fn, *args) -> concurrent.futures.Future:
        return self._request(lambda cid: ("call", cid, fn, args))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        if not self._dead:
            try:
                self._send(("stop",))
            except OSError:
                pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._reader.join(timeout)

    # ------------------------------------------------------------------ replies and outputs

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "outputs":  # built into RequestOutputs only when a stream is read
                self._send_records(msg[1])
            elif kind == "reply":
                _, cid, ok, value = msg
                fut = self._pending.pop(cid, None)
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_result(value) if ok else fut.set_exception(value)
            elif kind == "step_failed":
                _, rids, message = msg
                self._send_all([(rid, EngineDeadError(f"engine step failed: {message}"), 0, True) for rid in rids])
        self._dead = True
        for fut in list(self._pending.values()):
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError("the engine process has exited"))
        self._pending.clear()
        self._send_all([(rid, EngineDeadError("engine shut down"), 0, True) for rid in list(self._streams)])


# ---------------------------------------------------------------------- the child process

def _picklable_error(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - some exceptions carry unpicklable state
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Sender:
    """The child's messages to the parent. A step's OutputRecords are pickled on the
    engine's thread (fast, and no second thread holding the GIL inside pickle.dumps when
    the engine wants it back); a thread of their own writes them, so a parent that is slow
    to read never stalls a step on a full pipe."""

    def __init__(self, conn):
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_sent: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="jaxengine-sender", daemon=True)
        self._thread.start()

    def send(self, msg: tuple) -> None:
        self._queue.put(msg)

    def outputs(self, records: list[OutputRecord]) -> None:
        sent = self._prompt_sent
        for rec in records:
            rid = rec[0]
            if rid in sent:
                rec[1] = rec[2] = None  # the parent's stream has them
            if rec[3]:  # finished
                sent.discard(rid)
            else:
                sent.add(rid)
        self._queue.put(pickle.dumps(("outputs", records), protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                if isinstance(msg, bytes):
                    self._conn.send_bytes(msg)  # read by the parent's conn.recv() like any message
                else:
                    self._conn.send(msg)
            except (pickle.PicklingError, AttributeError, TypeError) as e:  # a call's result
                self._conn.send(("reply", msg[1], False, TypeError(f"the engine process cannot send this back: {e}")))
            except OSError:  # the parent is gone
                return


def _child_main(config: EngineConfig, conn, progress: bool) -> None:
    import signal

    from jaxengine.data_parallel import make_engine

    # Ctrl-C and a SIGTERM to the process group are the parent's to handle: it drains, then
    # stops this process. A parent that dies leaves EOF on the pipe, which ends the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        engine = make_engine(config, progress=progress)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", EngineInfo.of(engine)))
    sender = _Sender(conn)
    live: set[str] = set()  # requests added and not yet finished
    try:
        while True:
            if _handle_commands(engine, conn, sender, live):
                break
            if not engine.has_unfinished_requests():
                continue
            try:
                records = engine.step_records()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                rids = sorted(live)
                engine.abort_request(rids)
                engine.step_records()
                live.clear()
                sender.send(("step_failed", rids, repr(e)))
                continue
            if records:
                live.difference_update(rec[0] for rec in records if rec[3])
                sender.outputs(records)
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        sender.close()
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def _handle_commands(engine, conn, sender: _Sender, live: set[str]) -> bool:
    """Run every command waiting (block briefly when the engine is idle); True on stop."""
    timeout = 0.0 if engine.has_unfinished_requests() else 0.5
    while conn.poll(timeout):
        timeout = 0.0
        msg = conn.recv()
        kind = msg[0]
        if kind == "stop":
            if live:
                engine.abort_request(sorted(live))
                engine.step_records()
            return True
        if kind == "abort":
            if msg[1] in live:
                engine.abort_request(msg[1])
            continue
        cid = msg[1]
        try:
            if kind == "add":
                prompt, params, rid, out_kind, prio = msg[2]
                value = engine.add_request(prompt, params, request_id=rid, output_kind=out_kind, priority=prio)
                live.add(value)
            else:  # "call"
                value = msg[2](engine, *msg[3])
            sender.send(("reply", cid, True, value))
        except Exception as e:  # noqa: BLE001 - the caller gets it, the engine goes on
            sender.send(("reply", cid, False, _picklable_error(e)))
    return False
