"""Llama 3.1 / 3.2 JSON tool calls (vLLM's `llama3_json` parser): the whole output is

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

(the tag optional), one or more JSON objects separated by ";".

The rules, the same for `extract` and the stream:
- an output is read for calls only when it starts (after whitespace) with "{" or with
  `<|python_tag|>`; any other output is all content (vLLM's streaming rule: its
  non-streaming parser also searches text after prose, which a stream cannot undo);
- objects are read in turn; each must have a non-empty string "name" and "parameters" or
  "arguments" (whose value becomes the call's arguments JSON text);
- reading stops at the first thing that is not such an object after a ";": with no call
  read, the whole output is content, as written; otherwise the text from there on is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from serving.openai_api.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    arguments_json,
    new_call_id,
)

PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


def _call(obj: object) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
    else:
        return None
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=arguments_json(args))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _calls_start(text: str) -> int | None:
    """Where the first object may start, for an output read for calls; else None."""
    pos = _skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, pos):
        return pos + len(PYTHON_TAG)
    return pos if text.startswith("{", pos) else None


@dataclass
class _Step:
    """One step of reading calls at a position of the text."""

    call: ToolCall | None = None  # a call read, ending at `end`
    end: int = 0
    stop: int | None = None  # reading stops: the content starts here
    wait: bool = False  # the text ends before the step can be decided


def _read_object(text: str, pos: int, *, final: bool, may_complete: bool = True) -> _Step:
    """Read an object at `pos` (after whitespace). `may_complete` False: the caller knows
    no object can have completed since its last try (no new "}"), so wait without decoding."""
    k = _skip_ws(text, pos)
    if k == len(text):
        return _Step(stop=len(text)) if final else _Step(wait=True)
    if text[k] != "{":
        return _Step(stop=k)
    if not (final or may_complete):
        return _Step(wait=True)
    try:
        obj, end = _DECODER.raw_decode(text, k)
    except (ValueError, RecursionError):
        # An object never completes a prefix of itself, so a failure is final only at the end.
        return _Step(stop=k) if final else _Step(wait=True)
    call = _call(obj)
    return _Step(call=call, end=end) if call is not None else _Step(stop=k)


def _read_separator(text: str, pos: int, *, final: bool) -> _Step:
    """After a call: ";" and the next object's position, or where reading stops."""
    k = _skip_ws(text, pos)
    if k == len(text):
        return _Step(stop=len(text)) if final else _Step(wait=True)
    if text[k] != ";":
        return _Step(stop=k)
    return _Step(end=k + 1)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self) -> None:
        self._text = ""  # everything received, while calls are being read
        # "undecided" (only whitespace or part of the tag so far) -> "calls" -> "content", or
        # "undecided" -> "content" (the output is prose: passed through).
        self._mode: Literal["undecided", "calls", "content"] = "undecided"
        self._pos = 0  # where reading continues
        self._expect_object = True  # next: an object (else a separator)
        self._num_calls = 0
        self._tried_upto = 0  # _text length at the last failed object read

    # ------------------------------------------------------------------ whole output

    def extract(self, text: str) -> ExtractedToolCalls:
        pos = _calls_start(text)
        if pos is None:
            return ExtractedToolCalls(tool_calls=[], content=text or None)
        calls: list[ToolCall] = []
        expect_object = True
        while True:
            step = (_read_object if expect_object else _read_separator)(text, pos, final=True)
            if step.stop is not None:
                tail = text if not calls else text[step.stop:]
                return ExtractedToolCalls(tool_calls=calls, content=tail or None)
            if step.call is not None:
                calls.append(step.call)
            pos, expect_object = step.end, not expect_object

    # ------------------------------------------------------------------ streaming

    def extract_streaming(self, delta_text: str) -> StreamDelta:
        if self._mode == "content":
            return StreamDelta(content=delta_text or None)
        self._text += delta_text
        return self._advance(final=False)

    def finish(self) -> StreamDelta:
        if self._mode == "content":
            return StreamDelta()
        return self._advance(final=True)

    def _advance(self, final: bool) -> StreamDelta:
        text = self._text
        if self._mode == "undecided":
            k = _skip_ws(text, 0)
            pending_tag = PYTHON_TAG.startswith(text[k:]) and len(text) - k < len(PYTHON_TAG)
            if k == len(text) or pending_tag:
                if not final:
                    return StreamDelta()  # whitespace, or the start of <|python_tag|>: wait
                return self._to_content(0)
            start = _calls_start(text)
            if start is None:
                return self._to_content(0)
            self._mode, self._pos = "calls", start
        out = StreamDelta()
        while True:
            if self._expect_object:
                # Decoding again is only worth it once a "}" has come since the last try.
                step = _read_object(text, self._pos, final=final, may_complete="}" in text[self._tried_upto:])
            else:
                step = _read_separator(text, self._pos, final=final)
            if step.wait:
                if self._expect_object:
                    self._tried_upto = len(text)
                break
            if step.stop is not None:
                out.content = self._to_content(0 if self._num_calls == 0 else step.stop).content
                break
            if step.call is not None:
                call = step.call
                out.tool_calls += [ToolCallDelta(self._num_calls, call.id, call.name, ""),
                                   ToolCallDelta(self._num_calls, None, None, call.arguments)]
                self._num_calls += 1
            self._pos, self._expect_object = step.end, not self._expect_object
        return out

    def _to_content(self, start: int) -> StreamDelta:
        """From here on everything is content: the text held from `start`, then each piece."""
        held, self._text, self._mode = self._text[start:], "", "content"
        return StreamDelta(content=held or None)
