"""Parsers for outputs a forced `tool_choice` has constrained (serving.openai_api.structured_outputs):
no tags to look for, the whole output is the call(s).

- `NamedToolParser(name)`: the output is the named function's arguments object;
- `RequiredToolParser`: the output is `[{"name": ..., "parameters": {...}}, ...]`.

Streamed, a call goes out whole when the output ends (only then is its JSON known complete);
an output cut short (max_tokens) that does not parse is content.
"""

from __future__ import annotations

import json

from serving.openai_api.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    arguments_json,
    new_call_id,
)


class _WholeOutputParser(ToolParser):
    def __init__(self) -> None:
        self._text = ""

    def _calls(self, text: str) -> list[ToolCall] | None:
        raise NotImplementedError

    def extract(self, text: str) -> ExtractedToolCalls:
        calls = self._calls(text)
        if calls is None:
            return ExtractedToolCalls([], text or None)
        return ExtractedToolCalls(calls, None)

    def extract_streaming(self, delta_text: str) -> StreamDelta:
        self._text += delta_text
        return StreamDelta()

    def finish(self) -> StreamDelta:
        got = self.extract(self._text)
        return StreamDelta(content=got.content, tool_calls=[
            ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments) for i, c in enumerate(got.tool_calls)])


class NamedToolParser(_WholeOutputParser):
    name = "named"

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def _calls(self, text: str) -> list[ToolCall] | None:
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [ToolCall(new_call_id(), self.function, arguments_json(args))] if isinstance(args, dict) else None


class RequiredToolParser(_WholeOutputParser):
    name = "required"

    def _calls(self, text: str) -> list[ToolCall] | None:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(items, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("parameters"), dict)
                for c in items):
            return None
        return [ToolCall(new_call_id(), c["name"], arguments_json(c["parameters"])) for c in items]
