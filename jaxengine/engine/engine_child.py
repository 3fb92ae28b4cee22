"""The engine process's side of `jaxengine.engine.engine_process`: the loop the child runs
(`child_main`: its clients' commands, then a step, then the step's outputs to the
connections whose requests they are) and what it says about itself (`EngineInfo`). The
messages on the pipe are listed in engine_process's docstring; `AddRequest` is the one the
child takes to add a request."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import selectors
import signal
import time
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from jaxengine.config import EngineConfig
from jaxengine.engine.client_link import ClientLink
from jaxengine.engine.core_outputs import CoreOutputs
from jaxengine.engine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine.llm_engine import Engine
from jaxengine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AddRequest(NamedTuple):
    """An "add" command's request, as the child's engine core takes it."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    priority: int
    arrival_time: float


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
    def of(cls, engine: Engine | DataParallelEngine) -> EngineInfo:
        return cls(engine.model_config, engine.config, engine.max_model_len, engine.dtype, engine.kv_dtype,
                   engine.num_blocks, engine.tokenizer)


def _picklable_error(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - some exceptions carry unpicklable state
        return RuntimeError(f"{type(e).__name__}: {e}")


def child_main(config: EngineConfig, conns: list[Connection], progress: bool) -> None:
    """The engine process: build the engine, report it ready (or its load error), then serve
    the connections until connection 0 says "stop" or goes away."""
    # Ctrl-C and a SIGTERM to the process group are the parent's to handle: it drains, then
    # stops this process. A parent that dies leaves EOF on the pipe, which ends the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    try:
        engine = make_engine(config, progress=progress)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        for conn in conns:
            conn.send(("failed", _picklable_error(e)))
        raise SystemExit(1) from None  # a failed start is not a clean exit
    info = EngineInfo.of(engine)
    for conn in conns:
        conn.send(("ready", info))
    clients = _Clients(engine, conns)
    # The loop's time beside the steps, in the engine's own StepTiming: what serving costs
    # the engine process per step, and when the last busy spell started and ended.
    timing = engine.timing
    clock = time.perf_counter
    try:
        while True:
            t0, busy = clock(), engine.has_unfinished_requests()
            stop = clients.handle_commands(wait=not busy)
            if busy:  # not the wait for work when idle
                timing.commands_seconds += clock() - t0
            if stop:
                break
            if not engine.has_unfinished_requests():
                continue
            if not busy:  # a busy spell starts: its first request is in
                timing.busy_start = clock()
            try:
                out = engine.step_core()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                clients.fail_all(repr(e))
                continue
            if out:
                t0 = clock()
                clients.outputs(out)
                timing.outputs_seconds += clock() - t0
            if not engine.has_unfinished_requests():  # ... and ends: the last outputs are sent
                timing.busy_end = clock()
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        clients.close()
        engine.close()


class _Clients:
    """The child's connections: their commands, and each step's outputs to the connection
    whose request they are. Replies to one pass over the commands, and a step's outputs,
    leave in one write per connection (`ClientLink`)."""

    def __init__(self, engine: Engine | DataParallelEngine, conns: list[Connection]):
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
            engine.stop_requests([m for m in msg[1] if self.owner.get(m.sample_id) == i])
            return False
        cid = msg[1]
        try:
            if kind == "add":
                add: AddRequest = msg[2]
                rid = add.request_id
                samples = engine.add_core_request(add.prompt_token_ids, add.params, request_id=rid,
                                                  priority=add.priority, arrival_time=add.arrival_time)
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
