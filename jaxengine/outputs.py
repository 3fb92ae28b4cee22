"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple


class OutputKind(enum.Enum):
    CUMULATIVE = 0  # every update carries everything so far
    DELTA = 1  # every update carries only what is new (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank among the vocab, when known
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per token, when asked
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class CompletionRecord(NamedTuple):
    """A CompletionOutput as an OutputRecord carries it (the same fields)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


class OutputRecord(NamedTuple):
    """A RequestOutput as `Engine.step_records` hands it out, built for every request of
    every streaming step; only the consumer that reads it builds the RequestOutput (a stream
    that fell behind combines several records first, jaxengine.engine.async_engine). The
    four times are RequestMetrics' fields."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    finished: bool
    num_cached_tokens: int
    completions: list[CompletionRecord]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Per prompt position (None at 0): {token id: Logprob} for the actual token and the top-k.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @classmethod
    def from_record(cls, rec: OutputRecord) -> RequestOutput:
        return cls(
            request_id=rec.request_id, prompt=rec.prompt, prompt_token_ids=rec.prompt_token_ids,
            outputs=[CompletionOutput(index=c.index, text=c.text, token_ids=c.token_ids,
                                      cumulative_logprob=c.cumulative_logprob, logprobs=c.logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                     for c in rec.completions],
            finished=rec.finished,
            metrics=RequestMetrics(arrival_time=rec.arrival_time, first_scheduled_time=rec.first_scheduled_time,
                                   first_token_time=rec.first_token_time, finished_time=rec.finished_time),
            num_cached_tokens=rec.num_cached_tokens, prompt_logprobs=rec.prompt_logprobs,
        )
