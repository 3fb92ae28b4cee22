"""What a chat request's `response_format` and forced `tool_choice` constrain its output to
(jaxengine.StructuredOutputsParams), as vLLM builds them.

- `{"type": "json_object"}`: any JSON object; `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`: that schema (without one, any object). `strict` is accepted: the grammar
  holds the output to the schema either way.
- a named function: the output is that function's arguments, constrained to its `parameters`
  schema (the server wraps it into the call);
- "required": a JSON array of one or more `{"name": <a tool>, "parameters": <its schema>}`.
"""

from __future__ import annotations

from typing import Any

from jaxengine.sampling_params import StructuredOutputsParams
from serving.openai_api.errors import invalid
from serving.openai_api.protocol import ResponseFormat, ToolDefinition

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def response_format_params(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise invalid('response_format {"type": "json_schema"} needs a json_schema object ({"name", "schema"})',
                          param="response_format.json_schema")
        return StructuredOutputsParams(json=fmt.json_schema.schema_ or ANY_OBJECT)
    raise invalid(f"response_format type must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}",
                  param="response_format.type")


def parameters_schema(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters or ANY_OBJECT


def required_tools_schema(tools: list[ToolDefinition]) -> dict[str, Any]:
    """A JSON array of calls, each one tool's name and arguments (vLLM's shape for "required")."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": parameters_schema(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
