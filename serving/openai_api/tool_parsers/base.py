"""What every tool-call parser returns, and the interface the OpenAI server calls.

A parser turns a model's generated text into OpenAI `tool_calls` plus the remaining
`content`, either at once (`extract`) or piece by piece while the text streams
(`extract_streaming`, then `finish`). Each parser guarantees that the streamed pieces add
up to what `extract` returns for the same text, however the text is cut into pieces: a
streamed call appears only once it is known to be one (its JSON complete and valid), so a
stream never has to take back what it sent.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    id: str  # "call_<24 hex>", unique per call
    name: str
    arguments: str  # JSON text of the arguments object (json.dumps, non-ASCII kept as is)


@dataclass
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # the text outside the tool calls; None when there is none


@dataclass
class ToolCallDelta:
    """One entry of a streamed chunk's `delta.tool_calls` (OpenAI's shape): a call's first
    delta has its id and name and arguments ""; later ones only add argument text."""

    index: int  # the call's position among this choice's calls, from 0
    id: str | None
    name: str | None
    arguments: str


@dataclass
class StreamDelta:
    """What one piece of generated text adds. `tool_calls` may hold several entries in
    order (a call's first delta, then its arguments; or several calls): a server may send
    them as one chunk or one chunk each. Empty (content None, no calls) means nothing new."""

    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content) or bool(self.tool_calls)


def new_call_id() -> str:
    """OpenAI-style call id: "call_" and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


def arguments_json(value: object) -> str:
    # ensure_ascii=False: "café" stays "café" in the arguments, as vLLM sends it.
    return json.dumps(value, ensure_ascii=False)


def partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`: text a
    streaming parser must hold back, since the next piece may complete the tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolParser:
    """One instance per request choice: `extract_streaming` keeps state between pieces."""

    name: str = ""

    def extract(self, text: str) -> ExtractedToolCalls:
        """The tool calls in a complete output, and the content around them. Never raises
        for any text: what does not parse as a call is content."""
        raise NotImplementedError

    def extract_streaming(self, delta_text: str) -> StreamDelta:
        """Feed the next piece of generated text (in order); what it adds to the stream.
        Text that may still turn out to be part of a call is held back until it is clear."""
        raise NotImplementedError

    def finish(self) -> StreamDelta:
        """The output has ended: flush what is held back (an unfinished call's text, a
        partial tag). Call once, after the last `extract_streaming`."""
        raise NotImplementedError
