"""Which tool calling a chat request gets, from its `tools` / `tool_choice` and the server's
`--tool-call-parser` / `--enable-auto-tool-choice` (vLLM's flags and rules):

- no `tools`: no tool calling (a `tool_choice` other than "none" is a 400);
- "none": the tools are not rendered into the prompt and the output is not parsed: the
  model answers with a message (vLLM renders them anyway by default; a model shown tools
  may then write a call as text, which "none" asks it not to);
- "auto" (the default when there are tools): needs `--enable-auto-tool-choice` and a
  parser, else 400 naming the flags; the tools go to the chat template and the output is
  read by the parser: `message.tool_calls`, finish_reason "tool_calls";
- "required" and a named function: vLLM forces them with guided (structured) decoding,
  which this engine does not have yet, so they are a 400 saying so, never a silent "auto".
"""

from __future__ import annotations

from typing import NamedTuple

from serving.openai_api.errors import invalid
from serving.openai_api.options import HttpOptions
from serving.openai_api.protocol import ChatCompletionRequest, DeltaMessage, FunctionDelta, ToolCallDeltaOut
from serving.openai_api.tool_parsers import StreamDelta, ToolParser, get_tool_parser


class ToolSetup(NamedTuple):
    tools: list[dict] | None  # what the chat template gets
    parser: type[ToolParser] | None  # one instance per choice reads its output


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
    if choice != "auto":
        what = "'required'" if choice == "required" else f"a named function ({choice.function.name!r})"
        raise invalid(f"tool_choice {what} is not supported yet: it needs guided decoding, which this server does "
                      "not have; use 'auto' (the model decides) or 'none'", param="tool_choice")
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
