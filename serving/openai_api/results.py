"""A request's DELTA outputs added up: what the non-streaming responses are built from, and
what a stream's closing usage is counted from."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxengine.outputs import Logprob, RequestOutput
from serving.openai_api.protocol import PromptTokensDetails, Usage


@dataclasses.dataclass
class SampleResult:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestResult:
    """One engine request (one prompt, `n` samples)."""

    prompt: str | None = None
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    samples: dict[int, SampleResult] = dataclasses.field(default_factory=dict)

    def add(self, out: RequestOutput, *, keep_text: bool = True) -> None:
        self.prompt, self.prompt_token_ids = out.prompt, out.prompt_token_ids
        self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for o in out.outputs:
            s = self.samples.setdefault(o.index, SampleResult())
            s.token_ids += o.token_ids
            if keep_text:
                s.text += o.text
                if o.logprobs:
                    s.logprobs += o.logprobs
            if o.finish_reason is not None:
                s.finish_reason, s.stop_reason = o.finish_reason, o.stop_reason

    def prompt_text(self, tokenizer: Any, skip_special_tokens: bool = True) -> str:
        """The prompt as sent (text), or its token ids decoded."""
        if self.prompt is not None:
            return self.prompt
        if tokenizer is None:
            return ""
        return tokenizer.decode(self.prompt_token_ids, skip_special_tokens=skip_special_tokens)


def usage(results: list[RequestResult]) -> Usage:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(s.token_ids) for r in results for s in r.samples.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.num_cached_tokens for r in results)))
