"""Hermes / Qwen tool calls (vLLM's `hermes` parser): each call is a block

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

and the model may write several, with text before, between or after them.

The rules, the same for `extract` and the stream:
- a block runs from `<tool_call>` to the next `</tool_call>`, or to the end of the output
  when it is never closed (the model stopped on `</tool_call>` as a stop string);
- a block whose body is a JSON object with a non-empty string "name" is a call; its
  "arguments" (or "parameters"; absent: {}) become the JSON text of the call's arguments;
- any other block (malformed JSON, no name) stays in the content, tags and all;
- text outside the blocks is content, verbatim, except that text of only whitespace (the
  newlines between blocks) is dropped once the output has a block. Content None if empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from serving.openai_api.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    arguments_json,
    new_call_id,
    partial_prefix_len,
)

START = "<tool_call>"
END = "</tool_call>"


def parse_call(body: str) -> ToolCall | None:
    """The call in one block's body, or None when the body is not one."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # malformed, or nested too deep for json
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=arguments_json(args))


@dataclass
class _Part:
    text: str  # a block's body, without its tags
    is_block: bool
    closed: bool = True  # a block's "</tool_call>" was there


def _split(text: str) -> list[_Part]:
    """`text` as its text segments and blocks, in order."""
    parts: list[_Part] = []
    pos = 0
    while (i := text.find(START, pos)) >= 0:
        parts.append(_Part(text[pos:i], is_block=False))
        j = text.find(END, i + len(START))
        parts.append(_Part(text[i + len(START):len(text) if j < 0 else j], is_block=True, closed=j >= 0))
        pos = len(text) if j < 0 else j + len(END)
    parts.append(_Part(text[pos:], is_block=False))
    return parts


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self) -> None:
        self._buf = ""  # text received and not yet emitted or decided
        self._in_block = False  # _buf is (the start of) a block body
        self._seg_started = False  # content of the current text segment has been emitted
        self._seen_block = False
        self._num_calls = 0
        self._scanned = 0  # how much of a block's _buf has been searched for END

    # ------------------------------------------------------------------ whole output

    def extract(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(tool_calls=[], content=text or None)
        calls: list[ToolCall] = []
        content: list[str] = []
        for part in _split(text):
            if not part.is_block:
                if part.text.strip():
                    content.append(part.text)
            elif (call := parse_call(part.text)) is not None:
                calls.append(call)
            else:  # the block as written
                content.append(START + part.text + (END if part.closed else ""))
        return ExtractedToolCalls(tool_calls=calls, content="".join(content) or None)

    # ------------------------------------------------------------------ streaming

    def extract_streaming(self, delta_text: str) -> StreamDelta:
        self._buf += delta_text
        return self._advance(final=False)

    def finish(self) -> StreamDelta:
        return self._advance(final=True)

    def _advance(self, final: bool) -> StreamDelta:
        out = StreamDelta()
        content: list[str] = []
        while True:
            if self._in_block:
                j = self._buf.find(END, max(0, self._scanned - len(END) + 1))
                if j < 0 and not final:
                    self._scanned = len(self._buf)
                    break
                self._scanned = 0
                body = self._buf if j < 0 else self._buf[:j]
                self._buf = "" if j < 0 else self._buf[j + len(END):]
                self._in_block = False
                self._seg_started = False
                call = parse_call(body)
                if call is None:
                    content.append(START + body + ("" if j < 0 else END))
                else:
                    out.tool_calls += [ToolCallDelta(self._num_calls, call.id, call.name, ""),
                                       ToolCallDelta(self._num_calls, None, None, call.arguments)]
                    self._num_calls += 1
                continue
            i = self._buf.find(START)
            if i >= 0:
                self._emit_text(self._buf[:i], content, block_follows=True)
                self._buf = self._buf[i + len(START):]
                self._in_block = self._seen_block = True
                continue
            if final:
                self._emit_text(self._buf, content, block_follows=False)
                self._buf = ""
            else:
                # Hold back a possible start of "<tool_call>"; and whitespace that may yet
                # turn out to be only the gap before a block.
                keep = partial_prefix_len(self._buf, START)
                ready = self._buf[:len(self._buf) - keep]
                if self._seg_started or ready.strip():
                    content.append(ready)
                    self._seg_started = True
                    self._buf = self._buf[len(ready):]
            break
        out.content = "".join(content) or None
        return out

    def _emit_text(self, text: str, content: list[str], *, block_follows: bool) -> None:
        """The rest of a text segment, now that its end is known: whitespace-only
        segments are dropped when next to a block."""
        if self._seg_started or text.strip() or not (block_follows or self._seen_block):
            content.append(text)

