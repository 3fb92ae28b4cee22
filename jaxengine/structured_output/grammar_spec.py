"""`GrammarSpec`: a request's constraint as (kind, text), the key of the compiled-grammar cache."""

from __future__ import annotations

import json
from typing import NamedTuple

from jaxengine.sampling_params import StructuredOutputsParams


class GrammarSpec(NamedTuple):
    """What a backend compiles: `kind` is "json" (a JSON schema's text, keys sorted so equal
    schemas share a cache entry; json_object is the schema of any object), "regex" or "grammar"
    (EBNF); `choice` becomes an EBNF grammar of its alternatives. `any_whitespace`: JSON may have free whitespace."""

    kind: str
    text: str
    any_whitespace: bool = True


def _ebnf_string(s: str) -> str:
    """An EBNF string literal matching `s` exactly (JSON escapes are GBNF's)."""
    return json.dumps(s, ensure_ascii=False)


def grammar_spec(params: StructuredOutputsParams, disable_any_whitespace: bool = False) -> GrammarSpec:
    """`disable_any_whitespace`: the engine's default (either it or the request's turns it on)."""
    kind = params.kind
    ws = not (params.disable_any_whitespace or disable_any_whitespace)
    if kind == "json":
        schema = params.json if isinstance(params.json, dict) else json.loads(params.json)
        return GrammarSpec("json", json.dumps(schema, sort_keys=True), ws)
    if kind == "json_object":  # any JSON object (OpenAI's json_object), not any JSON value
        return GrammarSpec("json", '{"type": "object"}', ws)
    if kind == "choice":
        return GrammarSpec("grammar", "root ::= " + " | ".join(_ebnf_string(c) for c in params.choice))
    return GrammarSpec(kind, getattr(params, kind))
