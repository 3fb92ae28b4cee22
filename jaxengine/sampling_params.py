"""`SamplingParams`: how one request is sampled and when it stops (vLLM names and defaults).

Validated in `__post_init__`, so a bad value fails at the API boundary with a message that
names the field, the value and the allowed range, never deep inside a jitted step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

MAX_STOP_STRINGS = 16  # stop strings are matched on the host every step; keep it cheap
MAX_STOP_TOKEN_IDS = 64  # the device sampler masks them before min_tokens: a fixed-size slot
MAX_LOGPROBS = 20  # top-k logprobs per token come back from the device; bounded like OpenAI's
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit; the runner packs them into a fixed-size array
_SAMPLING_EPS = 1e-5  # temperatures below this are treated as greedy (as vLLM does)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output to a grammar (vLLM's names): exactly one of `json` (a JSON
    schema, as a dict or its JSON text), `regex`, `choice` (one of these strings), `grammar`
    (EBNF, xgrammar's GBNF dialect) or `json_object=True` (any JSON object).

    Checked here only for shape (one field set, JSON text that parses, non-empty strings): whether
    the backend can compile it is checked when the request is added, with the backend's message.
    `disable_any_whitespace`: JSON without free whitespace between tokens (vLLM's option; a weak
    model cannot then spend its budget on blank lines).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        set_ = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(set_) if set_ else 'none'}")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a dict or JSON text, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be a bool")

    @property
    def kind(self) -> str:
        """Which of KINDS is set."""
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredOutputsParams:
        """From a JSON body (HTTP, gRPC's JSON form): unknown keys are a ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"structured_outputs has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters.

    Greedy decoding is `temperature=0`. `top_k` of -1 or 0 disables top-k (normalised
    to -1). `max_tokens=None` means "up to max_model_len". `stop` is normalised to a
    list. While fewer than `min_tokens` tokens are generated the device sampler must
    mask EOS and `stop_token_ids`; the scheduler also does not stop on them then.
    `n > 1` is fanned out by the engine into n child requests (see `Request.fan_out`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self._check_float("temperature", self.temperature, lo=0.0)
        self._check_float("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}"
            )
        if self.top_k == 0:
            self.top_k = -1
        self._check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        self._check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        self._check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        self._check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be None or a 64-bit integer, got {self.seed!r}")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_token_ids(self.stop_token_ids)

        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}"
                )
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

    @property
    def has_penalties(self) -> bool:
        """Repetition/presence/frequency penalties need every generated token on the host."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def has_per_step_work(self) -> bool:
        """Logit bias, min_tokens, penalties, top logprobs or a grammar's token mask: sampler work
        beyond the plain greedy / temperature / top-k / top-p variants, done row by row every step."""
        return bool(self.logit_bias or self.min_tokens or self.has_penalties or self.logprobs
                    or self.structured_outputs is not None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @staticmethod
    def _check_float(
        name: str,
        value: object,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> None:
        ok = _is_number(value) and math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value <= hi
        if not ok:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo:g}")
            if hi is not None:
                parts.append(f"<= {hi:g}")
            rng = " and ".join(parts + ["finite"])
            raise ValueError(f"{name} must be {rng}, got {value!r}")

    @staticmethod
    def _normalise_stop(stop: str | list[str] | None) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError(f"stop strings must be non-empty, got {list(stops)!r}")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(stops)}"
            )
        return list(stops)

    @staticmethod
    def _normalise_token_ids(ids: list[int] | None) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"
            )
        return list(ids)

    @staticmethod
    def _normalise_logit_bias(bias: dict[int, float] | None) -> dict[int, float]:
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> float, got {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(
                f"logit_bias must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}"
            )
        out: dict[int, float] = {}
        for tok, b in bias.items():
            # JSON clients send keys as strings ("123"); accept those, reject anything else.
            if isinstance(tok, str) and tok.isdigit():
                tok = int(tok)
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tok!r}")
            if not _is_number(b) or not math.isfinite(b) or not -100.0 <= b <= 100.0:
                raise ValueError(
                    f"logit_bias[{tok}] must be in [-100, 100] and finite, got {b!r}"
                )
            out[tok] = float(b)
        return out
