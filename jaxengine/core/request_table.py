"""Who holds which request: `RequestTable`, the one place that maps a request as added to its
samples (n > 1 fans out into "<id>-<i>"; n == 1 is its own sample), and `CoreRequests`, the
engine core's table with what the step loop keeps per sample (seeds, finishes not yet
reported)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from jaxengine.core.request import Request, RequestStatus, sample_request_ids
from jaxengine.core.sched.scheduler import Scheduler

P = TypeVar("P")  # what is kept per request as added
S = TypeVar("S")  # what is kept per sample


class RequestTable(Generic[P, S]):
    """Requests by the id they were added with, and their samples by sample id. A sample
    stays until `remove_sample` (its finish was handed on) or `remove` (the whole request)."""

    __slots__ = ("parents", "samples", "_sample_ids")

    def __init__(self) -> None:
        self.parents: dict[str, P] = {}
        self.samples: dict[str, S] = {}  # read directly on hot paths
        self._sample_ids: dict[str, list[str]] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.parents

    def __len__(self) -> int:
        return len(self.parents)

    def __iter__(self) -> Iterator[str]:
        return iter(self.parents)

    def add(self, request_id: str, parent: P, samples: Sequence[S]) -> list[str]:
        """Add a request with one entry per sample; returns the sample ids."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        sample_ids = sample_request_ids(request_id, len(samples))
        self.parents[request_id] = parent
        self._sample_ids[request_id] = sample_ids
        for sid, sample in zip(sample_ids, samples):
            self.samples[sid] = sample
        return sample_ids

    def sample_ids(self, request_id: str) -> list[str]:
        return self._sample_ids.get(request_id, [])

    def remove_sample(self, sample_id: str) -> S | None:
        return self.samples.pop(sample_id, None)

    def remove(self, request_id: str) -> P | None:
        """Forget a request and whatever of its samples is left."""
        for sid in self._sample_ids.pop(request_id, ()):
            self.samples.pop(sid, None)
        return self.parents.pop(request_id, None)


class CoreRequests:
    """The engine core's requests, from `add` until their last sample's finish is reported:
    each request's samples (fanned out here), their sampling seeds, the samples finished
    outside a step (aborts, stop strings) not yet reported, and how many live requests use
    penalties (those force synchronous steps)
    or structured outputs (their steps' samplers wait for grammar masks)."""

    def __init__(self, scheduler: Scheduler, seed: int) -> None:
        self.scheduler = scheduler
        self.table: RequestTable[list[Request], Request] = RequestTable()
        self.seeds: dict[str, int] = {}  # sample id -> sampling seed (the runner reads it)
        self.finished_outside: list[Request] = []
        self.num_penalised = 0
        self.num_constrained = 0  # live requests with structured outputs (their steps fill masks)
        self._rng = random.Random(seed)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.table

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def add(self, root: Request, grammar: Callable[[], Any] | None = None) -> list[str]:
        """Queue a request (fanned out into its samples when n > 1) with the scheduler;
        returns its sample ids. ValueError if it is there already or could never run.
        `grammar`: makes each sample's own grammar state (structured outputs)."""
        rid = root.request_id
        if rid in self.table:
            raise ValueError(f"request id {rid!r} is already in use")
        params = root.sampling_params
        samples = root.fan_out() if params.n > 1 else [root]
        added: list[str] = []
        if grammar is not None:
            for sample in samples:
                sample.structured_output = grammar()
        try:
            for sample in samples:
                self.scheduler.add_request(sample)
                added.append(sample.request_id)
        except ValueError:
            self.scheduler.finish_requests(added)
            raise
        if params.has_penalties:
            self.num_penalised += 1  # back when the request is done
        if params.structured_outputs is not None:
            self.num_constrained += 1
        for sample in samples:
            seed = sample.sampling_params.seed
            self.seeds[sample.request_id] = self._rng.getrandbits(32) if seed is None else seed
        return self.table.add(rid, samples, samples)

    def sample(self, sample_id: str) -> Request | None:
        return self.table.samples.get(sample_id)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Abort requests (ids as added): blocks are freed now, the finish is reported next."""
        for rid in request_ids:
            live = [s for s in self.table.parents.get(rid, ()) if not s.is_finished]
            self.scheduler.finish_requests([s.request_id for s in live], RequestStatus.FINISHED_ABORTED)
            self.finished_outside += live

    def stop(self, sample_id: str, stop: str) -> None:
        """Finish a sample whose text matched the stop string `stop`."""
        req = self.table.samples.get(sample_id)
        if req is not None and not req.is_finished:
            self.scheduler.finish_requests(sample_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
            self.finished_outside.append(req)

    def take_finished_outside(self) -> list[Request]:
        finished, self.finished_outside = self.finished_outside, []
        return finished

    def finish(self, req: Request) -> str | None:
        """A finished sample whose finish is being reported: forget it; returns the id of its
        request as added when that request is now entirely finished (and forgets it too)."""
        sid = req.request_id
        self.seeds.pop(sid, None)
        self.table.remove_sample(sid)
        parent = req.parent_request_id or sid
        samples = self.table.parents.get(parent)
        if samples is None or not all(s.is_finished for s in samples):
            return None
        self.table.remove(parent)
        if req.sampling_params.has_penalties:
            self.num_penalised -= 1
        if req.sampling_params.structured_outputs is not None:
            self.num_constrained -= 1
        return parent
