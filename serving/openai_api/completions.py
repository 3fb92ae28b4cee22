"""POST /v1/completions: text (or token id) prompts, OpenAI's legacy completions.

Each prompt of a batch is one engine request of `n` samples; choice `index` is
`prompt * n + sample`, as OpenAI numbers them. `echo` puts the prompt before the text (and,
with `logprobs`, the prompt tokens' logprobs before the completion's: the engine computes
them as prompt_logprobs). A stream starts only once every prompt has its first output, so
a request the engine rejects (a prompt over max_model_len, say) is a 400, not a broken
stream; after that, errors end the stream with an error event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from jaxengine.sampling_params import SamplingParams
from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.errors import ApiError, invalid
from serving.openai_api.logprobs import TokenStrings, append_completion
from serving.openai_api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    now,
)
from serving.openai_api.results import RequestResult, usage
from serving.openai_api.sampling import check_model, include_usage, sampling_params
from serving.openai_api.streaming import (
    DONE,
    Started,
    error_event,
    merged,
    open_stream,
    sse,
    started,
    until_disconnected,
)

MAX_PROMPTS = 1024  # prompts in one request: each is an engine request


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if all(type(t) is int for t in prompt):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise invalid(f"prompt must hold at most {MAX_PROMPTS} prompts, got {len(prompt)}", param="prompt")
    return list(prompt)


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix is not None:
        raise invalid("suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid(f"best_of must equal n ({req.n or 1}) on this server: it returns every sample", param="best_of")


async def create_completion(gate: EngineGate, req: CompletionRequest, request: Request) -> Response:
    check_model(req.model, gate.model_name)
    _check_supported(req)
    with_usage = include_usage(req)
    prompts = _prompts(req.prompt)
    k = req.logprobs
    params = sampling_params(req, gate.sampling_defaults, max_tokens=req.max_tokens, logprobs=k,
                             prompt_logprobs=k if req.echo and k is not None else None)
    engine = gate.engine()
    tokenizer = engine.engine.tokenizer
    response_id = f"cmpl-{uuid.uuid4().hex}"
    tickets = gate.admit([f"{response_id}-{i}" for i in range(len(prompts))])
    streams = [gate.generate(t, p, params) for t, p in zip(tickets, prompts)]
    view = _Builder(req, params, TokenStrings(tokenizer), tokenizer)
    if req.stream:
        return await open_stream(request, streams, partial(gate.release, tickets),
                                 lambda first: _events(gate, first, response_id, view, with_usage))

    async def run() -> list[RequestResult]:
        results = [RequestResult() for _ in prompts]
        async for item in merged(await started(streams)):
            results[item.index].add(item.output)
        return results

    try:
        results = await until_disconnected(request, run())
    finally:
        gate.release(tickets)
    choices = [view.choice(i, j, r, s) for i, r in enumerate(results) for j, s in sorted(r.samples.items())]
    body = CompletionResponse(id=response_id, model=gate.model_name, choices=choices, usage=usage(results))
    return JSONResponse(body.model_dump())


class _Builder:
    """Choices, whole or as stream pieces, for one request's settings."""

    def __init__(self, req: CompletionRequest, params: SamplingParams, strings: TokenStrings, tokenizer):
        self.req, self.n, self.strings, self.tokenizer = req, params.n, strings, tokenizer
        self.k, self.skip_special_tokens = req.logprobs, params.skip_special_tokens
        self.token_ids = bool(req.return_token_ids)

    def echo(self, r: RequestResult) -> tuple[str, CompletionLogprobs | None, int]:
        """The echoed prompt's text, its logprobs and the text offset after it."""
        if not self.req.echo:
            return "", (CompletionLogprobs() if self.k is not None else None), 0
        text = r.prompt_text(self.tokenizer, self.skip_special_tokens)
        if self.k is None:
            return text, None, len(text)
        lp = CompletionLogprobs()
        entries = r.prompt_logprobs or [None] * len(r.prompt_token_ids)
        end = append_completion(lp, r.prompt_token_ids, entries, self.k, self.strings, 0)
        # Offsets into the echoed text: tokens it does not show (a BOS the tokenizer added) come
        # first and sit at 0, so the completion's tokens start at len(text).
        if (shift := end - len(text)) > 0:
            lp.text_offset = [max(0, o - shift) for o in lp.text_offset]
        return text, lp, len(text)

    def choice(self, i: int, j: int, r: RequestResult, s) -> CompletionChoice:
        text, lp, offset = self.echo(r)
        if lp is not None:
            append_completion(lp, s.token_ids, s.logprobs, self.k, self.strings, offset)
        ids = dict(token_ids=list(s.token_ids), prompt_token_ids=list(r.prompt_token_ids)) if self.token_ids else {}
        return CompletionChoice(index=i * self.n + j, text=text + s.text, logprobs=lp,
                                finish_reason=s.finish_reason, stop_reason=s.stop_reason, **ids)


async def _events(gate: EngineGate, first: list[Started], response_id: str, view: _Builder,
                  with_usage: bool) -> AsyncIterator[str]:
    created, model = now(), gate.model_name
    results = [RequestResult() for _ in first]
    offsets: dict[int, int] = {}  # choice index -> its text offset so far (from its first piece on)

    def chunk(choices: list[CompletionChoice]) -> str:
        return sse(CompletionChunk(id=response_id, created=created, model=model, choices=choices))

    try:
        async for item in merged(first):
            r = results[item.index]
            r.add(item.output, keep_text=False)
            pieces = []
            for o in item.output.outputs:
                index = item.index * view.n + o.index
                text, lp, ids = o.text, None, {}
                if view.token_ids:
                    ids["token_ids"] = list(o.token_ids)
                if index not in offsets:  # this choice's first piece: the echo goes first
                    echo, lp, offsets[index] = view.echo(r)
                    text = echo + text
                    if view.token_ids:
                        ids["prompt_token_ids"] = list(r.prompt_token_ids)
                if view.k is not None:
                    lp = lp or CompletionLogprobs()
                    offsets[index] = append_completion(lp, o.token_ids, o.logprobs or [], view.k, view.strings,
                                                       offsets[index])
                if text or lp is not None or o.finish_reason is not None or ids.get("token_ids"):
                    pieces.append(CompletionChoice(index=index, text=text, logprobs=lp,
                                                   finish_reason=o.finish_reason, stop_reason=o.stop_reason, **ids))
            if pieces:
                yield chunk(pieces)
        if with_usage:
            yield sse(CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage(results)))
        yield DONE
    except ApiError as e:
        yield error_event(e)
        yield DONE
