"""Which tool calling a chat request gets, from its `tools` / `tool_choice` and the server's
`--tool-call-parser` / `--enable-auto-tool-choice` (vLLM's flags and rules):

- no `tools`: no tool calling (a `tool_choice` other than "none" is a 400);
- "none": the tools are not rendered into the prompt and the output is not parsed: the
  model answers with a message (vLLM renders them anyway by default; a model shown tools
  may then write a call as text, which "none" asks it not to);
- "auto" (the default when there are tools): needs `--enable-auto-tool-choice` and a
  parser, else 400 naming the flags; the tools go to the chat template and the output is
  read by the parser: `message.tool_calls`, finish_reason "tool_calls";
- "required" and a named function: forced with structured outputs, as vLLM does (no parser
  flag needed): a named function's output is its arguments, constrained to its `parameters`
  schema; "required" is a JSON array of calls of the given tools
  (serving.openai_api.structured_outputs). The server turns the output into `tool_calls`
  (tool_parsers/forced.py); finish_reason "tool_calls" for "required", "stop" for a named
  function (OpenAI's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from jaxengine.sampling_params import StructuredOutputsParams
from serving.openai_api.errors import invalid
from serving.openai_api.options import HttpOptions
from serving.openai_api.protocol import ChatCompletionRequest, DeltaMessage, FunctionDelta, ToolCallDeltaOut
from serving.openai_api.structured_outputs import parameters_schema, required_tools_schema
from serving.openai_api.tool_parsers import StreamDelta, ToolParser, get_tool_parser
from serving.openai_api.tool_parsers.forced import NamedToolParser, RequiredToolParser


class ToolSetup(NamedTuple):
    tools: list[dict] | None  # what the chat template gets
    parser: Callable[[], ToolParser] | None  # one instance per choice reads its output
    structured_outputs: StructuredOutputsParams | None = None  # a forced tool_choice's constraint
    named: bool = False  # a named function was forced: finish_reason stays "stop"


NO_TOOLS = ToolSetup(None, None)


def tool_setup(req: ChatCompletionRequest, options: HttpOptions) -> ToolSetup:
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise invalid("tool_choice needs tools: the request has none", param="tool_choice")
        return NO_TOOLS
    choice = "auto" if choice is None else choice
    if choice == "none":
        return NO_TOOLS
    if choice == "required":
        so = StructuredOutputsParams(json=required_tools_schema(req.tools))
        return ToolSetup([t.model_dump(exclude_none=True) for t in req.tools], RequiredToolParser, so)
    if choice != "auto":
        tool = next((t for t in req.tools if t.function.name == choice.function.name), None)
        if tool is None:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not in tools "
                          f"({', '.join(t.function.name for t in req.tools)})", param="tool_choice")
        so = StructuredOutputsParams(json=parameters_schema(tool))
        return ToolSetup([t.model_dump(exclude_none=True) for t in req.tools], functools.partial(NamedToolParser, tool.function.name),
                         so, named=True)
    if not options.enable_auto_tool_choice or options.tool_call_parser is None:
        raise invalid('"auto" tool choice (the default when tools are given) needs the server started with '
                      "--enable-auto-tool-choice and --tool-call-parser NAME", param="tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    return ToolSetup(tools, get_tool_parser(options.tool_call_parser))


def joined(a: StreamDelta, b: StreamDelta) -> StreamDelta:
    content = (a.content or "") + (b.content or "")
    return StreamDelta(content=content or None, tool_calls=a.tool_calls + b.tool_calls)


def delta_message(d: StreamDelta) -> DeltaMessage:
    calls = [ToolCallDeltaOut(index=c.index, id=c.id, type="function" if c.id is not None else None,
                              function=FunctionDelta(name=c.name, arguments=c.arguments))
             for c in d.tool_calls]
    return DeltaMessage(content=d.content or None, tool_calls=calls or None)
