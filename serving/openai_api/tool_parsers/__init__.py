"""Tool-call parsers for the OpenAI server (`--tool-call-parser NAME`, vLLM's names).

`get_tool_parser(name)` gives the class; make one instance per request choice (a parser
keeps its stream's state). The interface and result types are in `base.py`.
"""

from __future__ import annotations

from serving.openai_api.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from serving.openai_api.tool_parsers.hermes import HermesToolParser
from serving.openai_api.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,  # the same JSON format, as in vLLM
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}: known parsers are {', '.join(sorted(TOOL_PARSERS))}"
        ) from None


__all__ = [
    "ExtractedToolCalls",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "StreamDelta",
    "TOOL_PARSERS",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "get_tool_parser",
]
