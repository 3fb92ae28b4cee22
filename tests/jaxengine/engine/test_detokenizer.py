"""Incremental detokenization, stop strings, tokenizer loading and chat templates.

Tokenizers are trained here with the `tokenizers` library (no hub downloads), wrapped in
`PreTrainedTokenizerFast`, saved to a temp dir and loaded back with `load_tokenizer`.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxengine.engine import detokenizer as detok_mod
from jaxengine.engine.detokenizer import IncrementalDetokenizer
from jaxengine.engine.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EMOJI = "😀🎉🚀👍🏽❤️🤖🌍"
CJK = "你好世界日本語한국어中文字符"
WORDS = [
    "hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    "STOP", "END", "café", "naïve", "über", "don't", "it's", "wasn't",
]
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    f"emoji {EMOJI} and {EMOJI[::-1]} again 😀😀 🎉🎉",
    f"CJK: {CJK} {CJK[::-1]} 你好 世界",
    "café naïve über résumé — “quotes” «guillemets» ½ ¼ €100",
    "don't stop, it's END of STOP story. wasn't it? yes! ok...",
] * 20
SETTINGS = dict(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save_and_load(tok_obj, path, **kw):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok_obj, **kw).save_pretrained(str(path))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """Byte-level BPE (GPT-2 / Llama 3 style) with few merges: emoji and CJK span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _save_and_load(
        tok, tmp_path_factory.mktemp("bpe"),
        bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """SentencePiece-style BPE with a Metaspace decoder (strips the leading space of a decode)."""
    from tokenizers import SentencePieceBPETokenizer

    t = SentencePieceBPETokenizer()
    t.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    return _save_and_load(t._tokenizer, tmp_path_factory.mktemp("sp"), unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def wp_tok(tmp_path_factory):
    """WordPiece with clean_up_tokenization_spaces=True: transformers' decode removes ' .' etc."""
    from tokenizers import BertWordPieceTokenizer

    t = BertWordPieceTokenizer(lowercase=False, clean_text=False, strip_accents=False)
    t.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["[UNK]", "[SEP]"])
    t._tokenizer.decoder.cleanup = False  # the clean-up under test is transformers' one
    tok = _save_and_load(t._tokenizer, tmp_path_factory.mktemp("wp"), unk_token="[UNK]", sep_token="[SEP]",
                         clean_up_tokenization_spaces=True)
    assert detok_mod.tokenizer_cleans_up_spaces(tok)
    return tok


def stream(tok, ids, chunks=None, **kw):
    """Feed ids (in the given chunk sizes, else one at a time); return (detok, deltas, stop)."""
    d = IncrementalDetokenizer(tok, [1, 2, 3], **kw)
    deltas, stop, i = [], None, 0
    sizes = list(chunks or [])
    while i < len(ids) and stop is None:
        n = sizes.pop(0) if sizes else 1
        delta, stop = d.update(ids[i : i + n])
        deltas.append(delta)
        i += n
    if stop is None:
        delta, stop = d.flush()
        deltas.append(delta)
    return d, deltas, stop


# ----------------------------------------------------------------------------- decoding


def test_corpus_splits_multibyte_chars(bpe_tok):
    """Sanity: the fixture really splits characters, so the properties below exercise it."""
    ids = bpe_tok.encode(EMOJI + CJK, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in bpe_tok.decode([i])]
    assert len(partial) > 5


text_st = st.lists(
    st.one_of(st.sampled_from(WORDS), st.sampled_from(list(EMOJI + CJK)), st.sampled_from([" ", "  ", ",", ".", "\n"]),
              st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=3)),
    max_size=25,
).map("".join)


@settings(**SETTINGS)
@given(text=text_st, chunks=st.lists(st.integers(1, 4), max_size=30))
def test_real_text_roundtrips_without_broken_chars(bpe_tok, text, chunks):
    ids = bpe_tok.encode(text, add_special_tokens=False)
    d, deltas, stop = stream(bpe_tok, ids, chunks)
    assert stop is None and d.finished
    assert "".join(deltas) == text == d.output_text
    assert not any("\ufffd" in x for x in deltas)


@settings(**SETTINGS)
@given(data=st.data(), skip=st.booleans())
def test_random_ids_match_full_decode(bpe_tok, data, skip):
    """Arbitrary id sequences (lone continuation bytes, specials, ...): the streamed text equals
    the full decode, and what has been emitted is always a prefix of the decode so far, so no
    delta carries a U+FFFD that the decode at that point does not have."""
    ids = data.draw(st.lists(st.integers(0, len(bpe_tok) - 1), max_size=60))
    d = IncrementalDetokenizer(bpe_tok, [], skip_special_tokens=skip)
    emitted = ""
    for k, t in enumerate(ids, 1):
        delta, stop = d.update([t])
        assert stop is None
        emitted += delta
        assert bpe_tok.decode(ids[:k], skip_special_tokens=skip).startswith(emitted)
        assert len(d._window) <= detok_mod._TRIM_AT + detok_mod._MAX_PENDING_TOKENS
    emitted += d.flush()[0]
    assert emitted == bpe_tok.decode(ids, skip_special_tokens=skip) == d.output_text


def test_fffd_held_until_character_completes(bpe_tok):
    ids = bpe_tok.encode("a😀b", add_special_tokens=False)
    d = IncrementalDetokenizer(bpe_tok, [])
    deltas = [d.update([t])[0] for t in ids]
    assert "".join(deltas) == "a😀b" and "\ufffd" not in "".join(deltas)
    assert "😀" in deltas  # emitted whole, by the token that completes it
    # A dangling partial character is released by flush(), as the full decode has it.
    d = IncrementalDetokenizer(bpe_tok, [])
    part = ids[: ids.index(next(i for i in ids if "\ufffd" in bpe_tok.decode([i]))) + 1]
    out = "".join(d.update([t])[0] for t in part)
    assert "\ufffd" not in out
    assert out + d.flush()[0] == bpe_tok.decode(part)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(bpe_tok, skip):
    enc = lambda s: bpe_tok.encode(s, add_special_tokens=False)  # noqa: E731
    sp = bpe_tok.convert_tokens_to_ids(["<|im_start|>", "<|eos|>"])
    ids = enc("hello") + [sp[0]] * 30 + enc(" world😀") + [sp[1]]
    d, deltas, _ = stream(bpe_tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == bpe_tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == ("hello world😀" if skip else "hello" + "<|im_start|>" * 30 + " world😀<|eos|>")


@settings(**SETTINGS)
@given(text=text_st, chunks=st.lists(st.integers(1, 3), max_size=30))
def test_metaspace_prefix_space_matches_full_decode(sp_tok, text, chunks):
    ids = sp_tok.encode(text, add_special_tokens=False)
    _, deltas, _ = stream(sp_tok, ids, chunks)
    assert "".join(deltas) == sp_tok.decode(ids, skip_special_tokens=True)
    if len(ids) > 1:  # the diff against left context keeps the spaces a windowed decode would strip
        _, deltas, _ = stream(sp_tok, ids[1:])
        assert "".join(deltas) == sp_tok.decode(ids[1:], skip_special_tokens=True)


@settings(**SETTINGS)
@given(text=st.text(alphabet=" 'nmtsvrex.?!,", max_size=40), chunks=st.lists(st.integers(1, 4), max_size=40))
def test_cleanup_spaces_streams_exactly(text, chunks):
    """transformers' clean_up_tokenization (' .' -> '.', " n't" -> "n't", ...) is not local;
    the streamed clean-up must still equal the clean-up of the whole text."""

    class CharTok:  # ids are code points; decode applies transformers' clean-up like a real one
        clean_up_tokenization_spaces = True
        all_special_ids: list[int] = []

        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):
            s = "".join(map(chr, ids))
            return self.clean_up_tokenization(s) if clean_up_tokenization_spaces is not False else s

        from transformers import PreTrainedTokenizerBase

        clean_up_tokenization = PreTrainedTokenizerBase.clean_up_tokenization

    tok = CharTok()
    ids = [ord(c) for c in text]
    d, deltas, _ = stream(tok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids)
    assert len(d._cleanup_pending) <= 4


@settings(**SETTINGS)
@given(text=text_st)
def test_wordpiece_cleanup_matches_full_decode(wp_tok, text):
    ids = wp_tok.encode(text, add_special_tokens=False)
    _, deltas, _ = stream(wp_tok, ids)
    assert "".join(deltas) == wp_tok.decode(ids, skip_special_tokens=True)


def test_long_output_cost_is_bounded(bpe_tok):
    ids = bpe_tok.encode(" ".join(CORPUS), add_special_tokens=False)
    ids = (ids * (10_000 // len(ids) + 1))[:10_000]
    d = IncrementalDetokenizer(bpe_tok, [], stop=["never matches"])
    t0 = time.perf_counter()
    first = [d.update([t]) for t in ids[:1000]]
    t1 = time.perf_counter()
    for t in ids[1000:9000]:
        d.update([t])
    t2 = time.perf_counter()
    assert all(s is None for _, s in first)
    d.update(ids[9000:])
    out = d.output_text + d.flush()[0]
    assert out == bpe_tok.decode(ids)
    per_tok_early, per_tok_late = (t1 - t0) / 1000, (t2 - t1) / 8000
    assert per_tok_late < 3 * per_tok_early + 20e-6  # no growth with output length
    assert t2 - t0 < 5.0
    assert len(d._window) <= detok_mod._TRIM_AT + detok_mod._MAX_PENDING_TOKENS


# ----------------------------------------------------------------------------- stop strings


def _oracle(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Earliest position where some stop string is complete; tie -> the longest one."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def test_stop_string_across_token_boundaries(bpe_tok):
    ids = bpe_tok.encode("hello world, the quick brown fox", add_special_tokens=False)
    stop = "ld, the qu"
    assert not any(stop in bpe_tok.decode([t]) for t in ids)  # really spans several tokens
    d = IncrementalDetokenizer(bpe_tok, [], stop=[stop])
    deltas, stops = [], []
    for t in ids:
        delta, s = d.update([t])
        deltas.append(delta)
        stops.append(s)
        if s:
            break
    assert stops[-1] == stop and stops.count(stop) == 1
    assert "".join(deltas) == d.output_text == "hello wor"
    assert d.finished and d.stop_str == stop
    assert d.update(ids[:3]) == ("", None) and d.flush() == ("", None)  # finished: nothing more


def test_include_stop_str_in_output(bpe_tok):
    ids = bpe_tok.encode("hello world, the quick brown fox", add_special_tokens=False)
    _, deltas, stop = stream(bpe_tok, ids, stop=["quick"], include_stop_str_in_output=True)
    assert stop == "quick" and "".join(deltas) == "hello world, the quick"
    # The text after the stop string inside the completing token is dropped.
    _, deltas, stop = stream(bpe_tok, ids, stop=["qu"], include_stop_str_in_output=True)
    assert "".join(deltas) == "hello world, the qu"


def test_multiple_stop_strings_earliest_wins(bpe_tok):
    text = "hello world, the quick brown fox jumps over the lazy dog."
    ids = bpe_tok.encode(text, add_special_tokens=False)
    for chunks in (None, [len(ids)], [3] * 30):  # token by token, all at once, in chunks
        _, deltas, stop = stream(bpe_tok, ids, chunks, stop=["lazy", "brown", "world, t"])
        assert stop == "world, t" and "".join(deltas) == "hello "
        _, deltas, stop = stream(bpe_tok, ids, chunks, stop=["fox", "brown fox jumps", "quick"])
        assert stop == "quick" and "".join(deltas) == "hello world, the "
        # "wn" completes before "brown f": the first point where any stop string is complete.
        _, deltas, stop = stream(bpe_tok, ids, chunks, stop=["brown f", "wn"])
        assert stop == "wn" and "".join(deltas) == "hello world, the quick bro"


def test_partial_stop_string_held_back_then_released(bpe_tok):
    ids = bpe_tok.encode("the quick brown fox", add_special_tokens=False)
    d = IncrementalDetokenizer(bpe_tok, [], stop=["quick red"])
    seen = ""
    for t in ids:
        delta, stop = d.update([t])
        assert stop is None
        seen += delta
        if bpe_tok.decode(ids[: ids.index(t) + 1]).endswith("quick "):
            assert seen == "the "  # "quick " could still become "quick red": held back
    assert seen == "the quick brown fox"  # released once "b" rules the stop string out
    # Held text that is still a possible prefix at the end is released by flush().
    ids = bpe_tok.encode("the quick", add_special_tokens=False)
    d = IncrementalDetokenizer(bpe_tok, [], stop=["quick red"])
    assert "".join(d.update([t])[0] for t in ids) == "the "
    assert d.flush() == ("quick", None) and d.output_text == "the quick"


@settings(**SETTINGS)
@given(
    text=text_st,
    data=st.data(),
    include=st.booleans(),
    chunks=st.lists(st.integers(1, 3), max_size=30),
)
def test_stop_strings_property(bpe_tok, text, data, include, chunks):
    """Streaming equals the char-by-char oracle, and (without include_stop_str) what a client
    has seen is always a prefix of the final text: no part of a stop string ever leaks."""
    ids = bpe_tok.encode(text, add_special_tokens=False)
    full = bpe_tok.decode(ids)
    pieces = st.text(alphabet=sorted(set(full)) or "x", min_size=1, max_size=4)
    if full:
        pieces = st.one_of(pieces, st.integers(0, len(full) - 1).flatmap(
            lambda i: st.integers(i + 1, min(len(full), i + 6)).map(lambda j: full[i:j])))
    stop = data.draw(st.lists(pieces, min_size=1, max_size=3, unique=True))
    want_text, want_stop = _oracle(full, stop, include)
    d, deltas, got_stop = stream(bpe_tok, ids, chunks, stop=stop, include_stop_str_in_output=include)
    assert got_stop == want_stop
    assert "".join(deltas) == want_text == d.output_text
    if not include:
        seen = ""
        for x in deltas:
            seen += x
            assert want_text.startswith(seen)


def test_min_tokens_defers_stop_strings(bpe_tok):
    ids = bpe_tok.encode("END hello END world", add_special_tokens=False)
    n_first = len(bpe_tok.encode("END", add_special_tokens=False))
    _, deltas, stop = stream(bpe_tok, ids, stop=["END"])
    assert stop == "END" and "".join(deltas) == ""
    _, deltas, stop = stream(bpe_tok, ids, stop=["END"], min_tokens=n_first + 1)
    assert stop == "END" and "".join(deltas) == "END hello "


def test_stop_validation(bpe_tok):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(bpe_tok, [], stop=[""])


# ----------------------------------------------------------------------------- tokenizer helpers


def test_load_tokenizer_errors(tmp_path, bpe_tok):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad"):
        load_tokenizer(tmp_path / "bad")
    # A bare tokenizer.json (no tokenizer_config.json) loads too.
    (tmp_path / "bare").mkdir()
    bpe_tok.backend_tokenizer.save(str(tmp_path / "bare" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "bare")
    assert tok.encode("hello 😀", add_special_tokens=False) == bpe_tok.encode("hello 😀", add_special_tokens=False)


def test_eos_token_ids(bpe_tok):
    eos = bpe_tok.eos_token_id
    assert eos_token_ids(bpe_tok, None) == (eos,)
    assert eos_token_ids(bpe_tok, 7) == (7, eos)
    assert eos_token_ids(bpe_tok, [7, eos, 9, 7]) == (7, eos, 9)
    assert eos_token_ids(None, (3,)) == (3,)
    with pytest.raises(ValueError):
        eos_token_ids(bpe_tok, ["x"])


def test_chat_template(bpe_tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 😀"}]
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        apply_chat_template(bpe_tok, msgs)
    ids = apply_chat_template(bpe_tok, msgs, chat_template=TEMPLATE)
    rendered = "<|bos|><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello 😀<|im_end|>\n<|im_start|>assistant\n"
    assert ids == bpe_tok.encode(rendered, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    bpe_tok.chat_template = TEMPLATE
    try:
        assert apply_chat_template(bpe_tok, msgs) == ids
    finally:
        bpe_tok.chat_template = None


@pytest.mark.parametrize(
    "bad, match",
    [
        ("hello", "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\]"),
        ([{"role": "user"}], "'content'"),
        ([{"content": "hi"}], "'role'"),
        ([{"role": "robot", "content": "hi"}], "robot"),
        ([{"role": "user", "content": None}], "str"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 3}], r"messages\[1\]"),
    ],
)
def test_chat_template_malformed_messages(bpe_tok, bad, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(bpe_tok, bad, chat_template=TEMPLATE)


def test_load_tokenizer_reads_chat_template(tmp_path, bpe_tok):
    bpe_tok.chat_template = TEMPLATE
    try:
        bpe_tok.save_pretrained(str(tmp_path))
    finally:
        bpe_tok.chat_template = None
    tok = load_tokenizer(tmp_path)
    ids = apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())  # a real tokenizer on disk
