"""`CoreOutputs`: what one engine-core step reports, by request id, and the named records
it carries. Plain columns, dicts and NamedTuples: cheap to build on the step loop and to
pickle to a front-end process (`jaxengine.engine.engine_process`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

from jaxengine.outputs import Logprob


class Finish(NamedTuple):
    """How a sample finished."""

    status: int  # a finished jaxengine.core.request.RequestStatus
    stop_reason: int | str | None  # the stop token id or stop string


class TokenLogprobs(NamedTuple):
    """A sampled token's logprob and the top-k (only for requests that asked for logprobs)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobs(NamedTuple):
    """One prompt position's answer to `prompt_logprobs`."""

    request_id: str
    position: int
    logprobs: dict[int, Logprob]  # the actual token's and the top-k


class FirstScheduled(NamedTuple):
    """A request's first admission (never repeated after a preemption)."""

    time: float  # time.monotonic()
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclasses.dataclass(slots=True)
class CoreOutputs:
    """One step's news, by request id (the samples' ids for n > 1: "<id>-<i>")."""

    # Requests that got a token, once per token (several times after a multi-step decode).
    req_ids: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # [len(req_ids)] that token
    # Finished this step (aborts and stop strings included).
    finished: dict[str, Finish] = dataclasses.field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = dataclasses.field(default_factory=dict)
    prompt_logprobs: list[PromptLogprobs] = dataclasses.field(default_factory=list)
    # First scheduled since the last output.
    scheduled: dict[str, FirstScheduled] = dataclasses.field(default_factory=dict)
    # Requests as added (the parent of n > 1 samples) that are now entirely finished.
    done: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.req_ids or self.finished or self.prompt_logprobs or self.scheduled or self.done)

    def extend(self, other: CoreOutputs) -> None:
        self.req_ids += other.req_ids
        self.token_ids += other.token_ids
        self.finished.update(other.finished)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs += other.prompt_logprobs
        self.scheduled.update(other.scheduled)
        self.done += other.done

    def split(self, owner: Mapping[str, int]) -> dict[int, CoreOutputs]:
        """The outputs per owner (owner[request id], for sample and parent ids); requests
        without an owner are dropped."""
        parts: dict[int, CoreOutputs] = {}

        def part(rid: str) -> CoreOutputs | None:
            i = owner.get(rid)
            if i is None:
                return None
            p = parts.get(i)
            return p if p is not None else parts.setdefault(i, CoreOutputs())

        for rid, tok in zip(self.req_ids, self.token_ids):
            if (p := part(rid)) is not None:
                p.req_ids.append(rid)
                p.token_ids.append(tok)
        for rid, fin in self.finished.items():
            if (p := part(rid)) is not None:
                p.finished[rid] = fin
        for rid, lp in self.logprobs.items():
            if (p := part(rid)) is not None:
                p.logprobs[rid] = lp
        for rid, first in self.scheduled.items():
            if (p := part(rid)) is not None:
                p.scheduled[rid] = first
        for entry in self.prompt_logprobs:
            if (p := part(entry.request_id)) is not None:
                p.prompt_logprobs.append(entry)
        for rid in self.done:
            if (p := part(rid)) is not None:
                p.done.append(rid)
        return parts
