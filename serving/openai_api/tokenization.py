"""POST /tokenize and /detokenize, in vLLM's shapes: `{"prompt": text}` or `{"messages":
[...]}` (rendered as /v1/chat/completions renders them) -> `{"count", "max_model_len",
"tokens"}`; `{"tokens": [ids]}` -> `{"prompt": text}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serving.openai_api.chat import template_messages
from serving.openai_api.engine_calls import detokenize as detokenize_on_engine
from serving.openai_api.engine_calls import render_chat, tokenize as tokenize_on_engine
from serving.openai_api.engine_gate import EngineGate
from serving.openai_api.errors import invalid
from serving.openai_api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serving.openai_api.sampling import check_model


async def tokenize(gate: EngineGate, req: TokenizeRequest) -> JSONResponse:
    check_model(req.model, gate.model_name)
    if (req.prompt is None) == (req.messages is None):
        raise invalid("send one of prompt (text) or messages (a chat)", param="prompt")
    if req.prompt is not None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await gate.call(tokenize_on_engine, req.prompt, add)
    else:
        if req.add_special_tokens:
            raise invalid("add_special_tokens does not apply to messages: the chat template adds its own",
                          param="add_special_tokens")
        tools = None if req.tools is None else [t.model_dump(exclude_none=True) for t in req.tools]
        ids = await gate.call(render_chat, template_messages(req.messages), gate.chat_template, tools,
                              req.add_generation_prompt)
    body = TokenizeResponse(count=len(ids), max_model_len=gate.max_model_len, tokens=ids)
    return JSONResponse(body.model_dump())


async def detokenize(gate: EngineGate, req: DetokenizeRequest) -> JSONResponse:
    check_model(req.model, gate.model_name)
    vocab = gate.engine().engine.model_config.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise invalid(f"tokens must be token ids in [0, {vocab}); got {bad[:5]}", param="tokens")
    text = await gate.call(detokenize_on_engine, req.tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
