"""POST /v1/chat/completions: messages rendered by the chat template (the server's
`--chat-template`, else the tokenizer's; on the engine, as the gRPC servicer renders chat),
one engine request of `n` samples, each a choice.

Streaming sends each choice's `delta.role` first, then `delta.content` (or, with tool calling,
`delta.tool_calls`) as it is generated, a chunk with its `finish_reason`, the usage chunk
when `stream_options.include_usage`, then `[DONE]`. Tool calling: tool_calls.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.openai_api.engine_calls import render_chat
from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.errors import ApiError, invalid
from serving.openai_api.logprobs import TokenStrings, chat_logprobs
from serving.openai_api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    DeltaMessage,
    FunctionCallOut,
    ToolCallOut,
    now,
)
from serving.openai_api.results import RequestResult, SampleResult, usage
from serving.openai_api.sampling import check_model, include_usage, sampling_params
from serving.openai_api.structured_outputs import response_format_params
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
from serving.openai_api.tool_calls import ToolSetup, delta_message, joined, tool_setup
from serving.openai_api.tool_parsers import StreamDelta


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The request's messages as chat templates read them: text parts joined by newlines
    (as vLLM does), "developer" as "system" (OpenAI's newer name for it)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                  f"supported, got type {part.type!r}", param=f"messages[{i}].content[{j}].type")
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise invalid(f"messages[{i}].content is required (only an assistant message with tool_calls may omit it)",
                          param=f"messages[{i}].content")
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _check(req: ChatCompletionRequest) -> int | None:
    """The top-logprobs count (None: no logprobs), after the checks the fields need."""
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(gate: EngineGate, req: ChatCompletionRequest, request: Request) -> Response:
    check_model(req.model, gate.model_name)
    with_usage = include_usage(req)
    k = _check(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    tools = tool_setup(req, gate.options)
    constraint = response_format_params(req.response_format)
    if constraint is not None and tools.structured_outputs is not None:
        raise invalid("response_format cannot be combined with a forced tool_choice ('required' or a named function)",
                      param="response_format")
    params = sampling_params(req, gate.sampling_defaults, max_tokens=max_tokens, logprobs=k,
                             structured_outputs=constraint or tools.structured_outputs)
    messages = template_messages(req.messages)
    strings = TokenStrings(gate.tokenizer())
    prompt = await gate.call(render_chat, messages, gate.chat_template, tools.tools)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    tickets = gate.admit([response_id])
    streams = [gate.generate(tickets[0], prompt, params)]
    if req.stream:
        return await open_stream(request, streams, partial(gate.release, tickets),
                                 lambda first: _events(gate, first, response_id, params.n, k, strings, tools,
                                                       with_usage))

    async def run() -> RequestResult:
        result = RequestResult()
        async for item in merged(await started(streams)):
            result.add(item.output)
        return result

    try:
        result = await until_disconnected(request, run())
    finally:
        gate.release(tickets)
    choices = [_choice(j, s, k, strings, tools) for j, s in sorted(result.samples.items())]
    body = ChatCompletionResponse(id=response_id, model=gate.model_name, choices=choices, usage=usage([result]))
    return JSONResponse(body.model_dump())


def _choice(j: int, s: SampleResult, k: int | None, strings: TokenStrings, tools: ToolSetup) -> ChatChoice:
    content, calls = s.text, []
    if tools.parser is not None:
        extracted = tools.parser().extract(s.text)
        content = extracted.content
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                 for c in extracted.tool_calls]
    lp = None if k is None else ChatLogprobs(content=chat_logprobs(s.token_ids, s.logprobs, k, strings))
    finish = "tool_calls" if calls and s.finish_reason == "stop" and not tools.named else s.finish_reason
    return ChatChoice(index=j, message=ChatMessageOut(content=content, tool_calls=calls), logprobs=lp,
                      finish_reason=finish, stop_reason=s.stop_reason)


async def _events(gate: EngineGate, first: list[Started], response_id: str, n: int,
                  k: int | None, strings: TokenStrings, tools: ToolSetup, with_usage: bool) -> AsyncIterator[str]:
    created, model = now(), gate.model_name
    result = RequestResult()
    parsers = {j: tools.parser() for j in range(n)} if tools.parser is not None else {}
    called: set[int] = set()  # choices that made a tool call

    def chunk(choices: list[ChatChunkChoice], **kw) -> str:
        return sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, **kw))

    try:
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(n)])
        async for item in merged(first):
            result.add(item.output, keep_text=False)
            pieces = []
            for o in item.output.outputs:
                if o.index in parsers:
                    parser = parsers[o.index]
                    d = parser.extract_streaming(o.text) if o.text else StreamDelta()
                    if o.finish_reason is not None:
                        d = joined(d, parser.finish())
                    if d.tool_calls:
                        called.add(o.index)
                    delta = delta_message(d)
                else:
                    delta = DeltaMessage(content=o.text or None)
                finish = o.finish_reason
                if finish == "stop" and o.index in called and not tools.named:
                    finish = "tool_calls"
                lp = None
                if k is not None and o.token_ids:
                    lp = ChatLogprobs(content=chat_logprobs(o.token_ids, o.logprobs or [], k, strings))
                if delta.content or delta.tool_calls or lp is not None or finish is not None:
                    pieces.append(ChatChunkChoice(index=o.index, delta=delta, logprobs=lp, finish_reason=finish,
                                                  stop_reason=o.stop_reason))
            if pieces:
                yield chunk(pieces)
        if with_usage:
            yield chunk([], usage=usage([result]))
        yield DONE
    except ApiError as e:
        yield error_event(e)
        yield DONE
