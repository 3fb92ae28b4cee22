"""What the HTTP routes run on the engine (`StreamingEngine.call`: its thread, or its child
process, so module-level functions of a light module: the child imports this one to
unpickle them). The tokenizer is used where the engine uses it, as the gRPC servicer does."""

from __future__ import annotations

from jaxengine.engine.tokenizer import apply_chat_template


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so text and chat messages cannot be used: send token ids")
    return engine.tokenizer


def render_chat(engine, messages: list[dict], chat_template: str | None, tools: list[dict] | None,
                add_generation_prompt: bool = True) -> list[int]:
    """Chat messages (and tools) rendered by the chat template (the server's --chat-template,
    else the tokenizer's) into prompt token ids."""
    return apply_chat_template(_tokenizer(engine), messages, chat_template=chat_template, tools=tools,
                               add_generation_prompt=add_generation_prompt)


def tokenize(engine, text: str, add_special_tokens: bool) -> list[int]:
    """As a completion prompt is tokenized (`engine.tokenize`), or without special tokens."""
    if add_special_tokens:
        return engine.tokenize(text)
    return _tokenizer(engine).encode(text, add_special_tokens=False)


def detokenize(engine, ids: list[int]) -> str:
    return _tokenizer(engine).decode(ids)
