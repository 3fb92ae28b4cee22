"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses
import enum


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


# A RequestOutput as plain lists and tuples, what `Engine.step_records` hands out: ~3x cheaper
# to build and to pickle than the dataclasses, on every request of every streaming step.
#   [request_id, prompt, prompt_token_ids, finished, num_cached_tokens,
#    (arrival_time, first_scheduled_time, first_token_time, finished_time),
#    [(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason), ...],
#    prompt_logprobs]
OutputRecord = list


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
    def from_record(cls, rec: OutputRecord) -> "RequestOutput":
        return cls(rec[0], rec[1], rec[2], [CompletionOutput(*c) for c in rec[6]], rec[3], RequestMetrics(*rec[5]),
                   rec[4], prompt_logprobs=rec[7])
