"""What the scheduler hands out: one step's `SchedulerOutput` (the single interface to the
model runner) and its `SchedulerStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxengine.core.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request  # read prompt/all tokens and sampling params from here
    num_tokens: int  # tokens to run this step: all_token_ids[start : start + num_tokens]
    start_position: int  # = num_computed_tokens before the step (position of the 1st token)
    block_ids: tuple[int, ...]  # the full block table (immutable), covers start + num_tokens
    new_block_ids: tuple[int, ...]  # appended this step (prefix hits first, then fresh ones)
    sample: bool  # the step ends at the last known token: the runner must sample one
    is_new: bool  # admitted from waiting this step (new or resumed after preemption)


@dataclass(slots=True)
class SchedulerOutput:
    """The single thing handed to the model runner for one step."""

    scheduled: list[ScheduledRequest]  # in schedule order (running first, then admitted)
    total_num_scheduled_tokens: int
    preempted_req_ids: list[str]  # preempted this step: drop their per-request state
    finished_req_ids: set[str] = field(default_factory=set)  # finished since the last step
    # Decode steps run back to back on the device (EngineConfig.num_scheduler_steps): each
    # scheduled request then decodes, holds slots for all of them and samples that many tokens.
    num_steps: int = 1

    @property
    def num_scheduled_seqs(self) -> int:
        return len(self.scheduled)


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int  # cumulative
