"""Between protobuf messages and the engine's Python types.

Requests: `sampling_params()` maps the proto onto `jaxengine.SamplingParams` (whose own
validation names the field and the allowed range); `prompt_input()` picks text / token ids /
chat. Outputs: `completion_deltas()` turns one engine delta into `CompletionDelta`s, and
`final_fields()` fills usage and timings on the last message. Every check here raises
ValueError with a message a client can act on; the servicer maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxengine.outputs import CompletionOutput, RequestOutput
from jaxengine.sampling_params import SamplingParams, StructuredOutputsParams
from serving.generated import engine_pb2 as pb

MAX_PROMPT_CHARS = 1 << 20  # text beyond this cannot fit any context we serve; reject before tokenizing
MAX_CHAT_MESSAGES = 1024
MAX_REQUEST_ID_CHARS = 256

# Proto fields with presence: copied only when set, so the engine's defaults apply otherwise.
_OPTIONAL = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "max_tokens", "logprobs", "skip_special_tokens")

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
}


def sampling_params(p: pb.SamplingParams, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    """`defaults` (the model's generation_config sampling fields) fill the fields `p` leaves unset."""
    kw: dict = {**(defaults or {}), **{name: getattr(p, name) for name in _OPTIONAL if p.HasField(name)}}
    kw.update(
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), include_stop_str_in_output=p.include_stop_str_in_output,
        ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, logit_bias=dict(p.logit_bias),
    )
    if p.HasField("structured_outputs"):
        kw["structured_outputs"] = structured_outputs(p.structured_outputs)
    if any(t < 0 for t in kw["stop_token_ids"]):
        raise ValueError(f"sampling_params.stop_token_ids must be token ids >= 0, got {[t for t in kw['stop_token_ids'] if t < 0][:5]}")
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise ValueError(f"sampling_params.{e}") from None


def structured_outputs(so: pb.StructuredOutputs) -> StructuredOutputsParams:
    kind = so.WhichOneof("constraint")
    if kind is None:
        raise ValueError("sampling_params.structured_outputs: set one of json, regex, choice, grammar, json_object")
    value = list(so.choice.choices) if kind == "choice" else getattr(so, kind)
    try:
        return StructuredOutputsParams(**{kind: value}, disable_any_whitespace=so.disable_any_whitespace)
    except ValueError as e:
        raise ValueError(f"sampling_params.{e}") from None


def request_id(request: pb.GenerateRequest) -> str | None:
    rid = request.request_id
    if not rid:
        return None
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return rid


def chat_messages(chat: pb.ChatMessages) -> list[dict]:
    if not chat.messages:
        raise ValueError("chat.messages must not be empty")
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise ValueError(f"chat.messages must have at most {MAX_CHAT_MESSAGES} messages, got {len(chat.messages)}")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def prompt_input(msg: pb.GenerateRequest | pb.TokenizeRequest) -> tuple[str, object]:
    """('text', str) | ('token_ids', list[int]) | ('chat', list[dict]); ValueError if unusable."""
    kind = msg.WhichOneof("input")
    if kind is None:
        fields = "text, token_ids or chat" if isinstance(msg, pb.GenerateRequest) else "text or chat"
        raise ValueError(f"the request has no input: set one of {fields}")
    if kind == "text":
        if not msg.text:
            raise ValueError("text must not be empty")
        if len(msg.text) > MAX_PROMPT_CHARS:
            raise ValueError(f"text must be at most {MAX_PROMPT_CHARS} characters, got {len(msg.text)}")
        return kind, msg.text
    if kind == "token_ids":
        if not msg.token_ids.ids:
            raise ValueError("token_ids.ids must not be empty")
        return kind, list(msg.token_ids.ids)
    return kind, chat_messages(msg.chat)


def _logprobs(out: CompletionOutput) -> list[pb.PositionLogprobs]:
    result = []
    for tok, entry in zip(out.token_ids, out.logprobs or []):
        sampled = entry.get(tok)
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None), key=lambda x: x[1].rank)
        result.append(pb.PositionLogprobs(
            sampled=pb.TokenLogprob(token_id=tok, logprob=sampled.logprob if sampled else 0.0, rank=(sampled.rank or 0) if sampled else 0),
            top=[pb.TokenLogprob(token_id=t, logprob=lp.logprob, rank=lp.rank) for t, lp in top],
        ))
    return result


def completion_deltas(out: RequestOutput, reported_finished: set[int]) -> list[pb.CompletionDelta]:
    """The samples of one DELTA output that carry something new (tokens, text, or their
    finish reason, sent once: indices already in `reported_finished` are skipped)."""
    deltas = []
    for o in out.outputs:
        newly_finished = o.finish_reason is not None and o.index not in reported_finished
        if not (o.token_ids or o.text or newly_finished):
            continue
        d = pb.CompletionDelta(index=o.index, token_ids=o.token_ids, text=o.text)
        if o.logprobs is not None:
            d.logprobs.extend(_logprobs(o))
        if o.cumulative_logprob is not None:
            d.cumulative_logprob = o.cumulative_logprob
        if newly_finished:
            reported_finished.add(o.index)
            d.finish_reason = FINISH_REASONS.get(o.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
            if isinstance(o.stop_reason, str):
                d.stop_string = o.stop_reason
            elif isinstance(o.stop_reason, int):
                d.stop_token_id = o.stop_reason
        deltas.append(d)
    return deltas


def final_fields(resp: pb.GenerateResponse, out: RequestOutput, completion_tokens: int) -> None:
    m = out.metrics
    resp.usage.prompt_tokens = len(out.prompt_token_ids)
    resp.usage.completion_tokens = completion_tokens
    resp.usage.cached_prompt_tokens = out.num_cached_tokens
    if m.first_scheduled_time is not None:
        resp.timings.queue_time_s = m.first_scheduled_time - m.arrival_time
    if m.first_token_time is not None:
        resp.timings.ttft_s = m.first_token_time - m.arrival_time
    if m.finished_time is not None:
        resp.timings.e2e_s = m.finished_time - m.arrival_time
