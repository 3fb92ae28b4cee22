"""Tool-call parsers: what `extract` finds in whole outputs, and that the stream adds up to
the same calls and content however the output is cut into pieces (one character at a time,
random splits from hypothesis)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.openai_api.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    StreamDelta,
    ToolParser,
    get_tool_parser,
)


@dataclass
class Streamed:
    content: str = ""
    calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments"} per index


def stream(cls: type[ToolParser], pieces: list[str]) -> Streamed:
    """Feed `pieces` in order, then finish; check each delta's shape on the way."""
    parser = cls()
    deltas: list[StreamDelta] = [parser.extract_streaming(p) for p in pieces] + [parser.finish()]
    out = Streamed()
    for d in deltas:
        assert d.content is None or d.content != "", "empty content is None"
        out.content += d.content or ""
        for t in d.tool_calls:
            if t.index == len(out.calls):  # a call's first delta: id and name, no arguments yet
                assert t.id and t.id.startswith("call_") and t.name and t.arguments == "", t
                out.calls.append({"id": t.id, "name": t.name, "arguments": ""})
            else:
                assert t.index == len(out.calls) - 1 and t.id is None and t.name is None, t
                out.calls[t.index]["arguments"] += t.arguments
    return out


def assert_stream_matches_extract(cls: type[ToolParser], text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    want = cls().extract(text)
    got = stream(cls, pieces)
    assert got.content == (want.content or ""), (text, pieces)
    assert [(c["name"], c["arguments"]) for c in got.calls] == [(c.name, c.arguments) for c in want.tool_calls]
    assert len({c["id"] for c in got.calls}) == len(got.calls)


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """Whole, one character at a time, and a few seeded random splits."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(8):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return out


def _calls(result) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    assert TOOL_PARSERS["hermes"] is HermesToolParser and get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'.*hermes.*llama3_json"):
        get_tool_parser("nope")


# --------------------------------------------------------------------------- hermes

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Zürich"}}</tool_call>'

HERMES_CASES = {
    "plain": ("Just an answer, no tools.", [], "Just an answer, no tools."),
    "one call": (WEATHER, [("get_weather", {"city": "Paris", "unit": "celsius"})], None),
    "content then calls": ("Let me look.\n" + WEATHER + "\n" + TIME + "\n",
                           [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Zürich"})],
                           "Let me look.\n"),
    "text after a call": (TIME + " done", [("get_time", {"tz": "Europe/Zürich"})], " done"),
    "malformed stays content": ('<tool_call>{"name": "f", "arguments": {</tool_call>', [],
                                '<tool_call>{"name": "f", "arguments": {</tool_call>'),
    "malformed beside a good one": ("<tool_call>not json</tool_call>\n" + TIME,
                                    [("get_time", {"tz": "Europe/Zürich"})], "<tool_call>not json</tool_call>"),
    "no name": ('<tool_call>{"arguments": {}}</tool_call>', [], '<tool_call>{"arguments": {}}</tool_call>'),
    "not an object": ("<tool_call>[1, 2]</tool_call>", [], "<tool_call>[1, 2]</tool_call>"),
    "unclosed at the end": ('<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}', [("f", {"x": [1, 2]})], None),
    "unclosed and cut off": ('Hm <tool_call>{"name": "f", "argu', [], 'Hm <tool_call>{"name": "f", "argu'),
    "parameters, or no arguments": ('<tool_call>{"name": "a", "parameters": {"k": 1}}</tool_call>'
                                    '<tool_call>{"name": "b"}</tool_call>', [("a", {"k": 1}), ("b", {})], None),
    "unicode": ('天气？<tool_call>{"name": "météo", "arguments": {"ville": "Zürich 🌧"}}</tool_call>',
                [("météo", {"ville": "Zürich 🌧"})], "天气？"),
    "a tag inside a string": ('<tool_call>{"name": "echo", "arguments": {"s": "<tool_call>"}}</tool_call>',
                              [("echo", {"s": "<tool_call>"})], None),
    "not quite a tag": ("a <tool x> b <tool_cal", [], "a <tool x> b <tool_cal"),
    "only whitespace": ("\n \n", [], "\n \n"),
}


@pytest.mark.parametrize("case", sorted(HERMES_CASES))
def test_hermes_extract(case):
    text, calls, content = HERMES_CASES[case]
    got = HermesToolParser().extract(text)
    assert _calls(got) == calls
    assert got.content == content
    assert all(c.id.startswith("call_") for c in got.tool_calls)


@pytest.mark.parametrize("case", sorted(HERMES_CASES))
def test_hermes_stream_matches_extract_in_every_chunking(case):
    text = HERMES_CASES[case][0]
    for pieces in chunkings(text):
        assert_stream_matches_extract(HermesToolParser, text, pieces)


def test_hermes_arguments_text_is_json_dumps_keeping_non_ascii():
    got = HermesToolParser().extract('<tool_call>{"name": "f", "arguments": {"b": "é", "a": 1}}</tool_call>')
    assert got.tool_calls[0].arguments == '{"b": "é", "a": 1}'


def test_hermes_ids_are_unique():
    got = HermesToolParser().extract(TIME * 5)
    assert len({c.id for c in got.tool_calls}) == 5


def test_hermes_stream_sends_content_early_and_holds_back_a_partial_tag():
    p = HermesToolParser()
    assert p.extract_streaming("Sure, ").content == "Sure, "
    assert p.extract_streaming("checking <tool").content == "checking "  # "<tool" may be a tag
    assert p.extract_streaming("_c").content is None
    d = p.extract_streaming('all>{"name": "f", "arguments": {"x": 1}}')
    assert d.content is None and d.tool_calls == []  # the call is not complete yet
    d = p.extract_streaming("</tool_call>")  # the call as soon as its block closes
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "f", ""), (0, None, '{"x": 1}')]
    assert not p.extract_streaming("\n")  # whitespace after a call: held, then dropped
    assert not p.finish()


def test_hermes_stream_releases_a_false_tag_start():
    p = HermesToolParser()
    assert p.extract_streaming("a <tool").content == "a "
    assert p.extract_streaming("box>").content == "<toolbox>"
    q = HermesToolParser()
    assert q.extract_streaming("x <tool_ca").content == "x "
    assert q.finish().content == "<tool_ca"


def test_hermes_malformed_block_streams_as_content_when_it_closes():
    p = HermesToolParser()
    assert p.extract_streaming("<tool_call>{oops").content is None
    assert p.extract_streaming("}</tool_call>").content == "<tool_call>{oops}</tool_call>"


# --------------------------------------------------------------------------- llama3_json

LLAMA_CASES = {
    "plain": ("The weather is fine.", [], "The weather is fine."),
    "one call": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})], None),
    "python tag": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                   [("get_weather", {"city": "Paris"})], None),
    "several": ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": [true, null]}};',
                [("a", {"x": 1}), ("b", {"y": [True, None]})], None),
    "leading whitespace": ('\n {"name": "a", "parameters": {}}\n', [("a", {})], None),
    "text after the calls": ('{"name": "a", "parameters": {}} and then', [("a", {})], "and then"),
    "bad second object": ('{"name": "a", "parameters": {}}; {"name": 3}', [("a", {})], '{"name": 3}'),
    "malformed": ('{"name": "a", "parameters": {', [], '{"name": "a", "parameters": {'),
    "no parameters": ('{"name": "a"}', [], '{"name": "a"}'),
    "plain json answer": ('{"answer": 42}', [], '{"answer": 42}'),
    "tag only": ("<|python_tag|>", [], "<|python_tag|>"),
    "not quite the tag": ("<|python_ta", [], "<|python_ta"),
    "prose first": ('Sure: {"name": "a", "parameters": {}}', [], 'Sure: {"name": "a", "parameters": {}}'),
    "unicode": ('{"name": "météo", "parameters": {"ville": "Zürich 🌧", "note": "天气"}}',
                [("météo", {"ville": "Zürich 🌧", "note": "天气"})], None),
    "braces in strings": ('{"name": "a", "parameters": {"s": "}{;"}}', [("a", {"s": "}{;"})], None),
    "only whitespace": ("  \n", [], "  \n"),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama3_json_extract(case):
    text, calls, content = LLAMA_CASES[case]
    got = Llama3JsonToolParser().extract(text)
    assert _calls(got) == calls
    assert got.content == content


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama3_json_stream_matches_extract_in_every_chunking(case):
    text = LLAMA_CASES[case][0]
    for pieces in chunkings(text):
        assert_stream_matches_extract(Llama3JsonToolParser, text, pieces)


def test_llama3_json_streams_prose_at_once_and_each_call_when_complete():
    p = Llama3JsonToolParser()
    assert p.extract_streaming("Hello").content == "Hello"
    assert p.extract_streaming(" {").content == " {"
    q = Llama3JsonToolParser()
    assert not q.extract_streaming('<|python_tag|>{"name": "a", "parameters": {"x": ')
    d = q.extract_streaming('1}}; {"name": "b",')
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "a", ""), (0, None, '{"x": 1}')]
    d = q.extract_streaming(' "parameters": {}}')
    assert [(t.index, t.name) for t in d.tool_calls] == [(1, "b"), (1, None)]
    assert not q.finish()


# --------------------------------------------------------------------------- random outputs, random splits


def _call_json(draw, key: str) -> str:
    name = draw(st.sampled_from(["get_weather", "search", "météo", "f"]))
    args = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8), st.booleans(),
                                                                 st.none()), max_size=3))
    return json.dumps({"name": name, key: args}, ensure_ascii=draw(st.booleans()))


# Text made of characters and tag pieces, so that near-tags and partial tags come up often.
_TEXT = st.lists(st.sampled_from(list("ab <>/_{}\";\n") + ["é", "🌧", "tool_call", "<tool_call", "</tool_c", "<|python_"]),
                 max_size=8).map("".join)


@st.composite
def hermes_outputs(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["text", "call", "bad", "ws"]))
        if kind == "text":
            parts.append(draw(_TEXT))
        elif kind == "call":
            parts.append("<tool_call>" + draw(st.sampled_from(["", "\n"])) + _call_json(draw, "arguments") + "</tool_call>")
        elif kind == "bad":
            parts.append("<tool_call>" + draw(_TEXT) + "</tool_call>")
        else:
            parts.append(draw(st.sampled_from(["\n", " ", "\n\n"])))
    if draw(st.booleans()):  # an unclosed last block
        parts.append("<tool_call>" + (_call_json(draw, "arguments") if draw(st.booleans()) else draw(_TEXT)))
    return "".join(parts)


@st.composite
def llama_outputs(draw) -> str:
    head = draw(st.sampled_from(["", " ", "<|python_tag|>", "\n<|python_tag|>"]))
    calls = [_call_json(draw, draw(st.sampled_from(["parameters", "arguments"]))) for _ in range(draw(st.integers(0, 3)))]
    text = head + draw(st.sampled_from(["; ", ";", " ; "])).join(calls)
    return text + draw(st.one_of(st.just(""), _TEXT))


def _split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]


@settings(max_examples=300, deadline=None)
@given(hermes_outputs(), st.lists(st.integers(0, 10_000), max_size=12))
def test_hermes_random_outputs_and_splits(text, cuts):
    assert_stream_matches_extract(HermesToolParser, text, _split_at(text, cuts))
    assert_stream_matches_extract(HermesToolParser, text, list(text) or [""])


@settings(max_examples=300, deadline=None)
@given(llama_outputs(), st.lists(st.integers(0, 10_000), max_size=12))
def test_llama3_json_random_outputs_and_splits(text, cuts):
    assert_stream_matches_extract(Llama3JsonToolParser, text, _split_at(text, cuts))
    assert_stream_matches_extract(Llama3JsonToolParser, text, list(text) or [""])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(TOOL_PARSERS)), st.text(max_size=40), st.lists(st.integers(0, 100), max_size=6))
def test_any_text_never_raises(name, text, cuts):
    cls = get_tool_parser(name)
    assert_stream_matches_extract(cls, text, _split_at(text, cuts))


def test_deeply_nested_json_is_content_not_a_crash():
    deep = "[" * 100_000
    for cls, text in ((HermesToolParser, f"<tool_call>{deep}</tool_call>"), (Llama3JsonToolParser, "{" + deep)):
        assert cls().extract(text).tool_calls == []
        assert stream(cls, [text]).content == text
