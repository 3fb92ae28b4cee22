"""The constraints the structured-output tests generate under, and their validators."""

from __future__ import annotations

import json
import re

# Nested objects, arrays, enums, required fields; strings and numbers bounded, so that a weak
# model at temperature 0.7 can finish an object within the tests' max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        # Bounded by patterns, not maxLength: xgrammar 0.2.9's maxLength strings admit control
        # characters (test_backend.py says so).
        "name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z ]{0,7}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[a-z]{0,6}$"}, "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2}(\.[0-9])?"
CHOICES = ["red", "green", "blue", "dark purple"]
# EBNF (xgrammar's GBNF): a small arithmetic expression.
EBNF = r'''root ::= expr
expr ::= term (("+" | "-") term){0,2}
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]{0,2}'''


def matches_ebnf(text: str) -> bool:
    """Whether `text` is a sentence of EBNF (a recursive-descent parser of the same grammar)."""

    def num(i: int) -> int | None:
        m = re.match(r"[1-9][0-9]{0,2}", text[i:])
        return i + m.end() if m else None

    def term(i: int) -> int | None:
        if text.startswith("(", i):
            j = expr(i + 1)
            return j + 1 if j is not None and text.startswith(")", j) else None
        return num(i)

    def expr(i: int) -> int | None:
        j = term(i)
        for _ in range(2):
            if j is None or j >= len(text) or text[j] not in "+-":
                break
            k = term(j + 1)
            if k is None:
                return None
            j = k
        return j

    return expr(0) == len(text)


def loads(text: str) -> object:
    return json.loads(text)
