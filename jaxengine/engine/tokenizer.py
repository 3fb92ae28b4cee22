"""Tokenizer loading and the small helpers the engine needs (EOS ids, chat templates).

Everything is local: `load_tokenizer` never touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


class _NoTorchBanner(logging.Filter):
    """Drops the "PyTorch was not found" line `import transformers` logs when torch is absent:
    we use transformers for tokenizers only, which need no torch. A filter on transformers'
    own root logger (the banner is logged there), so its other warnings and everyone else's
    logging stay as they are. Installed on import of this module, before anything here or
    an unpickled tokenizer imports transformers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


_transformers_log = logging.getLogger("transformers")
if not any(isinstance(f, _NoTorchBanner) for f in _transformers_log.filters):
    _transformers_log.addFilter(_NoTorchBanner())

# Files any of which means "there is a tokenizer in this directory".
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
CHAT_ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(model_dir: str | os.PathLike, **kwargs):
    """Load the tokenizer saved in a checkpoint directory (no network access).

    Raises FileNotFoundError if `model_dir` does not exist or holds none of the tokenizer
    files (`TOKENIZER_FILES`), and ValueError if the files are there but cannot be loaded.
    Extra kwargs go to `AutoTokenizer.from_pretrained`.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {str(path)!r} does not exist (expected a checkpoint directory "
            f"with tokenizer.json / tokenizer_config.json)"
        )
    present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not present:
        raise FileNotFoundError(
            f"no tokenizer files in {str(path)!r}: expected one of {', '.join(TOKENIZER_FILES)} "
            f"(save one with tokenizer.save_pretrained({str(path)!r}), or pass tokenizer=<dir>: "
            "--tokenizer DIR on the command line)"
        )
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("trust_remote_code", False)
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        first_error = e
    if "tokenizer.json" in present:
        # A bare tokenizer.json (no config AutoTokenizer can map to a class) still loads.
        try:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        except Exception:  # noqa: BLE001
            pass
    raise ValueError(
        f"could not load the tokenizer in {str(path)!r} (files: {', '.join(present)}): "
        f"{type(first_error).__name__}: {first_error}"
    ) from first_error


def eos_token_ids(tokenizer, model_eos_ids: int | Iterable[int] | None = ()) -> tuple[int, ...]:
    """All ids that end generation: the model's (config / generation_config) then the tokenizer's.

    Deduplicated, order kept (model's first). `tokenizer` may be None. Instruct models often
    list several (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>) while the tokenizer names one.
    """
    ids: list[int] = []
    if model_eos_ids is None:
        model_eos_ids = ()
    elif isinstance(model_eos_ids, int):
        model_eos_ids = (model_eos_ids,)
    for t in model_eos_ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"EOS token ids must be non-negative ints, got {t!r} in {model_eos_ids!r}")
        ids.append(t)
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(tok_eos, int) and not isinstance(tok_eos, bool):
        ids.append(tok_eos)
    elif isinstance(tok_eos, (list, tuple)):
        ids.extend(int(t) for t in tok_eos)
    return tuple(dict.fromkeys(ids))


def validate_messages(messages) -> list[dict]:
    """Check chat messages: a non-empty list of {"role", "content"} dicts (extra keys, such as
    an assistant's "tool_calls" or a tool result's "tool_call_id", go to the template as they
    are). An assistant message with tool calls may have content None (OpenAI's shape)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing and not (missing == ["content"] and m.get("tool_calls")):
            raise ValueError(f"messages[{i}] is missing {', '.join(repr(k) for k in missing)}: {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}")
        msg = dict(m)
        if "tool_calls" in msg and msg["tool_calls"] is not None:
            if m["role"] != "assistant":
                raise ValueError(
                    f"messages[{i}] has 'tool_calls' but role {m['role']!r}: only assistant messages make calls"
                )
            msg["tool_calls"] = _template_tool_calls(msg["tool_calls"], f"messages[{i}]['tool_calls']")
        content = msg.setdefault("content", None)  # templates test `message.content`
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
        out.append(msg)
    return out


def _template_tool_calls(calls, where: str) -> list[dict]:
    """An assistant's tool calls as chat templates read them: OpenAI sends each call's
    "arguments" as JSON text, and templates (transformers' convention, followed by vLLM)
    expect the object, so JSON text that parses to an object is parsed. Copies: the caller's
    messages are left as they were."""
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ValueError(f"{where}[{j}] must be a dict, got {type(call).__name__}")
        call = dict(call)
        fn = call.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call["function"] = {**fn, "arguments": args}
        out.append(call)
    return out


def _validate_tools(tools) -> list[dict]:
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of dicts (JSON schemas of functions), got {type(tools).__name__}")
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ValueError(f"tools[{i}] must be a dict, got {type(t).__name__}")
    return [dict(t) for t in tools]


def apply_chat_template(
    tokenizer,
    messages,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Render `messages` with the tokenizer's chat template (or `chat_template`) to prompt ids.

    `tools` (OpenAI's request field: [{"type": "function", "function": {...}}, ...]) reaches
    the template as its `tools` variable, as in transformers; None (no tools) renders as
    before tools existed. The template supplies BOS and role markers itself, so no special
    tokens are added on top.
    """
    msgs = validate_messages(messages)
    tool_list = None if tools is None else _validate_tools(tools)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template, so chat messages cannot be formatted: "
            "start the server with `jaxengine serve --chat-template FILE` (a Jinja template file, or the "
            "template itself), pass chat_template=<template> in Python, or add 'chat_template' to the "
            "model's tokenizer_config.json; or send plain-text prompts"
        )
    out = tokenizer.apply_chat_template(
        msgs,
        tools=tool_list,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    if hasattr(out, "keys") and "input_ids" in out:  # older transformers may return a dict
        out = out["input_ids"]
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]


def load_chat_template(value: str | os.PathLike) -> str:
    """A chat template given as a file or as the template itself (vLLM's --chat-template):
    an existing file is read; text with Jinja's markers is the template; anything else reads
    as a file path that does not exist, and raises FileNotFoundError saying so."""
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a template too long or odd to be a path
        pass
    text = str(value)
    if "{{" in text or "{%" in text:
        return text
    raise FileNotFoundError(
        f"chat template file {text!r} does not exist (pass a Jinja template file, or the template text itself)"
    )
