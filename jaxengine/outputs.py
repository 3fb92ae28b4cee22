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

    def merge_delta(self, newer: "RequestOutput") -> None:
        """Append a later DELTA output of the same request to this one, as if both steps'
        tokens had come in one step (what a consumer that fell behind receives)."""
        mine = {o.index: o for o in self.outputs}
        for o in newer.outputs:
            old = mine.get(o.index)
            if old is None:
                self.outputs.append(o)
                continue
            old.text += o.text
            old.token_ids = old.token_ids + o.token_ids
            if o.logprobs is not None:
                old.logprobs = (old.logprobs or []) + o.logprobs
            old.cumulative_logprob, old.finish_reason, old.stop_reason = o.cumulative_logprob, o.finish_reason, o.stop_reason
        self.finished, self.metrics, self.num_cached_tokens = newer.finished, newer.metrics, newer.num_cached_tokens
        if newer.prompt_logprobs is not None:
            self.prompt_logprobs = newer.prompt_logprobs
