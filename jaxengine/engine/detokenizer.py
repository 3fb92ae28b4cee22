"""Incremental detokenization with stop strings (host side, one instance per sample).

`IncrementalDetokenizer.update(new_token_ids)` turns newly sampled token ids into the text
delta that is safe to stream now, and reports a matched stop string. Three stages, each
holding back a small, bounded amount of text:

1. **Window decode** (vLLM's prefix_offset/read_offset idea). Only a short window of
   recent token ids is kept: `ctx` tokens whose text was already emitted (left context)
   followed by the not-yet-emitted ones. The delta is `decode(window)` minus
   `decode(context)`. Decoding with left context (instead of the new tokens alone) keeps
   prefix-space handling right (Metaspace / `Strip` decoders strip a leading space only at
   the start of a decode, which cancels in the difference) and byte-level BPE tokens that
   continue a multi-byte UTF-8 character. While the window decodes to text ending in
   U+FFFD (an incomplete UTF-8 character, or a byte-fallback group still open), nothing is
   emitted; the completed character comes out with the token that completes it. The
   window is trimmed back to `ctx` tokens every few tokens, so the cost of an update does
   not grow with the output length. Special tokens skipped by `skip_special_tokens` are
   never put in the window (the tokenizer drops them before decoding anyway), so a run of
   them cannot grow the window or starve the context.
2. **Space clean-up** (only if the tokenizer's own `decode` would apply
   `clean_up_tokenization`, e.g. a WordPiece/Unigram tokenizer with
   `clean_up_tokenization_spaces=True`; transformers 5 never does it for BPE). The
   clean-up is applied to committed chunks; the tail that could still be the start of a
   clean-up pattern (at most a few characters) is held back.
3. **Stop strings**, matched on the (cleaned) text stream, across token boundaries. The
   earliest *completed* match wins (the first position in the text where any stop string
   ends; on a tie the longest, i.e. earliest-starting, one). Unless
   `include_stop_str_in_output`, the longest tail that is a proper prefix of some stop
   string is held back until it is known not to start a stop string, so a streaming client
   never sees part of a stop string.

Invariant (tested): with no stop string matched, the concatenation of all deltas of
`update(...)` plus `flush()` equals `tokenizer.decode(all_output_ids,
skip_special_tokens=...)`. With a match, it equals that text truncated before the stop
string (or after it with `include_stop_str_in_output`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

_REPLACEMENT_CHAR = "\ufffd"

# Left-context tokens kept in the decode window once text has been emitted. One would do
# for byte-level BPE and Metaspace; a few more cover decoders whose output depends on a
# short run of neighbours (byte-fallback groups, Replace patterns spanning tokens).
_CONTEXT_TOKENS = 6
# The window is trimmed back to the context once it holds this many tokens.
_TRIM_AT = 2 * _CONTEXT_TOKENS
# While the window ends in U+FFFD, at most this many pending tokens are held before we look
# for an earlier clean cut (a UTF-8 character is at most 4 bytes, and every token is at least
# one byte, so only a model emitting invalid bytes gets here).
_MAX_PENDING_TOKENS = 8

# Proper prefixes of the patterns replaced by transformers' `clean_up_tokenization`
# (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"). A cut after text
# ending in one of these could split a pattern occurrence.
_CLEANUP_UNSAFE_ENDINGS = (" n'", " 'v", " 'r", " '", " n", " ")

_skipped_ids_cache: "weakref.WeakKeyDictionary[object, frozenset[int]]" = weakref.WeakKeyDictionary()


def _skipped_special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops (checked, not assumed)."""
    try:
        return _skipped_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    candidates: set[int] = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            candidates.add(int(tid))
    skipped = frozenset(
        t for t in candidates
        if tokenizer.decode([t], skip_special_tokens=True, clean_up_tokenization_spaces=False) == ""
    )
    try:
        _skipped_ids_cache[tokenizer] = skipped
    except TypeError:
        pass
    return skipped


def tokenizer_cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether `tokenizer.decode(ids)` applies `clean_up_tokenization` (mirrors transformers)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    override = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    if hasattr(tokenizer, override):  # transformers >= 5 skips the clean-up for BPE models
        backend = getattr(tokenizer, "backend_tokenizer", None)
        model = getattr(backend, "model", None)
        if type(model).__name__ == "BPE" and not getattr(tokenizer, override):
            return False
    return True


def _cleanup_cut(text: str) -> int:
    """Largest c such that clean_up(committed + text[:c]) + clean_up(text[c:] + future) equals
    clean_up of the whole, whatever the future text is."""
    c = len(text)
    while c > 0:
        head = text[:c]
        if not head.endswith(_CLEANUP_UNSAFE_ENDINGS):
            return c
        # Inside a run of spaces: a pattern's second character is never a space, so no
        # occurrence can start at or straddle a cut followed by two more spaces.
        if head[-1] == " " and text[c : c + 2] == "  ":
            return c
        c -= 1
    return 0


class IncrementalDetokenizer:
    """Streams the text of one sample's output tokens; see the module docstring.

    `prompt_token_ids` is accepted for API symmetry with vLLM but is *not* used as decoding
    context: the output text is defined as `decode(output_ids)` (what `transformers` gives for
    the generated ids), which differs from "decode(prompt + output) minus decode(prompt)"
    for Metaspace tokenizers (leading space of the first output token) and when the prompt
    ends in the middle of a UTF-8 character.

    `min_tokens`: stop strings only take effect once at least this many output tokens have
    been passed to `update` (the engine's `min_tokens`); a stop string completed earlier is
    ordinary text.
    """

    def __init__(
        self,
        tokenizer: Any,  # a transformers tokenizer
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = bool(skip_special_tokens)
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self.include_stop_str_in_output = bool(include_stop_str_in_output)
        self.min_tokens = int(min_tokens)

        self._skipped = _skipped_special_ids(tokenizer) if self.skip_special_tokens else frozenset()
        self._cleanup = tokenizer_cleans_up_spaces(tokenizer)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        # Stage 1: window[:read] is emitted context whose text is `_context_text`.
        self._window: list[int] = []
        self._read = 0
        self._context_text = ""
        # Stage 2: raw text not yet cleaned up / committed.
        self._cleanup_pending = ""
        # Stage 3: text held back as a possible stop-string prefix, and the last
        # characters already emitted (matches may start there with include_stop_str).
        self._stop_held = ""
        self._stop_tail = ""

        self._num_output_tokens = 0
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self.finished = False
        self.stop_str: str | None = None

    # ------------------------------------------------------------------ public

    @property
    def output_text(self) -> str:
        """Concatenation of every delta returned so far (held-back text not included)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache] if self._text_cache else []
        return self._text_cache

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def update(self, new_token_ids: Sequence[int], *, final: bool = False) -> tuple[str, str | None]:
        """Feed newly generated ids; return (text delta safe to emit now, matched stop string).

        `final=True` (or `flush()`) marks the end of the output: everything held back is
        released. Once a stop string has matched, the detokenizer is finished: that call
        returns the stop string, and every later call returns ("", None).
        """
        if self.finished:
            return "", None
        self._num_output_tokens += len(new_token_ids)
        raw = self._decode_step(new_token_ids, final)
        if self._cleanup:
            raw = self._cleanup_step(raw, final)
        delta, stop = self._stop_step(raw, final)
        if final or stop is not None:
            self.finished = True
            self.stop_str = stop
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta, stop

    def flush(self) -> tuple[str, str | None]:
        """End of output (EOS, stop token, length, abort): release all held-back text."""
        return self.update((), final=True)

    # ------------------------------------------------------------------ stage 1

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_step(self, new_token_ids: Sequence[int], final: bool) -> str:
        window = self._window
        added = False
        for t in new_token_ids:
            t = int(t)
            if t not in self._skipped:
                window.append(t)
                added = True
        if not added and not (final and len(window) > self._read):
            return ""
        text = self._decode(window)
        cut = len(window)
        if not final and text.endswith(_REPLACEMENT_CHAR):
            if len(window) - self._read <= _MAX_PENDING_TOKENS:
                return ""
            # Invalid bytes for a while: emit up to the latest cut that decodes cleanly.
            cut = len(window) - 1
            while cut > self._read:
                text = self._decode(window[:cut])
                if not text.endswith(_REPLACEMENT_CHAR):
                    break
                cut -= 1
            if cut == self._read:
                return ""
        ctx = self._context_text
        delta = text[len(ctx):] if text.startswith(ctx) else _suffix_after_common_prefix(ctx, text)
        # Advance: window[:cut] is now emitted context.
        if cut >= _TRIM_AT:
            keep = window[cut - _CONTEXT_TOKENS :]
            self._window = keep
            self._read = _CONTEXT_TOKENS
            self._context_text = self._decode(keep[:_CONTEXT_TOKENS])
        else:
            self._read = cut
            self._context_text = text
        return delta

    # ------------------------------------------------------------------ stage 2

    def _cleanup_step(self, raw: str, final: bool) -> str:
        pending = self._cleanup_pending + raw
        cut = len(pending) if final else _cleanup_cut(pending)
        self._cleanup_pending = pending[cut:]
        return self.tokenizer.clean_up_tokenization(pending[:cut]) if cut else ""

    # ------------------------------------------------------------------ stage 3

    def _stop_step(self, text: str, final: bool) -> tuple[str, str | None]:
        if not self.stop:
            return text, None
        held = self._stop_held
        # Matches may start in text already emitted (only with include_stop_str_in_output)
        # or held back; they must end in the new text (older ones were checked already, or
        # completed before `min_tokens` and are ordinary text).
        buf = self._stop_tail + held + text
        old = len(self._stop_tail) + len(held)
        if self._num_output_tokens >= self.min_tokens:
            best: tuple[int, int, str] | None = None
            for s in self.stop:
                i = buf.find(s, max(0, old - len(s) + 1))
                if i >= 0:
                    key = (i + len(s), i, s)  # earliest end, then earliest start
                    if best is None or key[:2] < best[:2]:
                        best = key
            if best is not None:
                end, start, s = best
                cut = end if self.include_stop_str_in_output else start
                emitted_before = len(self._stop_tail)
                self._stop_held = self._stop_tail = ""
                return buf[emitted_before:cut] if cut > emitted_before else "", s
        emitted_before = len(self._stop_tail)
        hold = 0
        if not final and not self.include_stop_str_in_output:
            for k in range(min(len(buf) - emitted_before, self._max_stop_len - 1), 0, -1):
                suffix = buf[len(buf) - k :]
                if any(s.startswith(suffix) for s in self.stop):
                    hold = k
                    break
        out = buf[emitted_before : len(buf) - hold]
        self._stop_held = buf[len(buf) - hold :] if hold else ""
        if self.include_stop_str_in_output:
            keep = self._max_stop_len - 1
            self._stop_tail = buf[max(0, len(buf) - keep) :] if keep else ""
        return out, None


def _suffix_after_common_prefix(a: str, b: str) -> str:
    """Fallback for a decoder whose output is not prefix-stable: b past its common prefix with a."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return b[n:]
