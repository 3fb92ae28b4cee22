"""OutputProcessor: an EngineCore's per-step token ids -> what callers see.

    records, stops = processor.process(core_outputs)

Per request it keeps the prompt, each sample's tokens, its incremental detokenizer (text
and stop strings), logprob dicts and timings, and builds OutputRecords (see
jaxengine.outputs) in the request's OutputKind. A stop string is found here, so the sample
is finished here and `stops` names it for the core to stop too (`EngineCore.stop_requests`);
tokens the core sends for it afterwards are ignored.

`Engine` runs one in its own process; `EngineClient` runs one in each front-end process,
so detokenizing and building streamed outputs never holds up the engine's step loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

from jaxengine.core.request import RequestStatus
from jaxengine.core.request_table import RequestTable
from jaxengine.engine.core_outputs import CoreOutputs, TokenLogprobs
from jaxengine.engine.detokenizer import IncrementalDetokenizer
from jaxengine.outputs import CompletionRecord, Logprob, OutputKind, OutputRecord, RequestMetrics
from jaxengine.sampling_params import SamplingParams

_STOPPED = int(RequestStatus.FINISHED_STOPPED)


class StopMatch(NamedTuple):
    """A sample whose text matched a stop string: the engine core must stop it too."""

    sample_id: str
    stop: str


@dataclasses.dataclass(eq=False)
class _Sample:
    """One of a request's n samples, as its caller sees it."""

    state: _RequestState = dataclasses.field(repr=False)  # the request it is a sample of
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    sent_tokens: int = 0  # DELTA bookkeeping
    sent_text: int = 0
    sent_logprobs: int = 0


@dataclasses.dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._requests: RequestTable[_RequestState, _Sample] = RequestTable()

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
            kind: OutputKind, arrival_time: float) -> None:
        """A request the core has accepted (the same id, and so the same sample ids)."""
        state = _RequestState(
            request_id, prompt, prompt_token_ids, params, kind, [], RequestMetrics(arrival_time),
            prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(prompt_token_ids),
        )
        for i in range(params.n):
            detok = None
            # Streams and stop strings need text every step; a plain offline request is
            # decoded once when it finishes (saves ~12 us per token).
            if self.tokenizer is not None and (params.stop or kind is not OutputKind.FINAL_ONLY):
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=list(params.stop or []), include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            state.samples.append(_Sample(state, i, detok, logprobs=[] if params.logprobs is not None else None))
        self._requests.add(request_id, state, state.samples)

    def remove(self, request_ids: list[str]) -> None:
        """Forget requests without an output (the core failed them)."""
        for rid in request_ids:
            self._requests.remove(rid)

    def request_ids_of(self, sample_ids: list[str]) -> list[str]:
        """The requests (ids as added) of these samples, those still here."""
        samples = self._requests.samples
        return list(dict.fromkeys(s.state.request_id for sid in sample_ids if (s := samples.get(sid)) is not None))

    def __len__(self) -> int:
        return len(self._requests)

    def process(self, out: CoreOutputs) -> tuple[list[OutputRecord], list[StopMatch]]:
        """One step's outputs: the records of the requests it advanced (FINAL_ONLY ones only
        when they finish), and the samples the core must stop."""
        touched: dict[str, _RequestState] = {}
        stops: list[StopMatch] = []
        samples = self._requests.samples
        for sid, first in out.scheduled.items():
            if (sample := samples.get(sid)) is not None:
                state = sample.state
                state.metrics.first_scheduled_time = state.metrics.first_scheduled_time or first.time
                state.num_cached_tokens = max(state.num_cached_tokens, first.num_cached_tokens)
        for entry in out.prompt_logprobs:
            if (sample := samples.get(entry.request_id)) is not None and sample.state.prompt_logprobs is not None:
                sample.state.prompt_logprobs[entry.position] = entry.logprobs
        finished = out.finished
        now = time.monotonic()
        # A request may get several tokens in one output (multi-step decode); only its last
        # can be the one that finished it.
        last_at = {sid: i for i, sid in enumerate(out.req_ids)} if finished else {}
        for i, (sid, tok) in enumerate(zip(out.req_ids, out.token_ids)):
            sample = samples.get(sid)
            if sample is None:
                continue
            state = sample.state
            if sample.finish_reason is not None:  # stopped here by a stop string
                continue
            sample.token_ids.append(tok)
            fin = finished.get(sid) if last_at.get(sid) == i else None
            if sample.detokenizer is not None:
                # FINISHED_STOPPED from the core is EOS or a stop token id: not part of the text (as vLLM).
                _, stop = sample.detokenizer.update([] if fin is not None and fin.status == _STOPPED else [tok])
                if stop is not None:
                    sample.finish_reason, sample.stop_reason = "stop", stop
                    if fin is None:
                        stops.append(StopMatch(sid, stop))
            if (lp := out.logprobs.get(sid)) is not None:
                self._add_logprobs(sample, tok, lp)
            state.metrics.first_token_time = state.metrics.first_token_time or now
            if state.kind is not OutputKind.FINAL_ONLY or sample.finish_reason is not None or fin is not None:
                touched[state.request_id] = state
        for sid, fin in finished.items():
            sample = samples.get(sid)
            if sample is None:
                continue
            state = sample.state
            if sample.finish_reason is None:
                sample.finish_reason, sample.stop_reason = RequestStatus(fin.status).finish_reason, fin.stop_reason
                if sample.detokenizer is not None:
                    sample.detokenizer.flush()  # release text held back for a possible stop string
            touched[state.request_id] = state
        return [r for r in (self._make_record(st) for st in touched.values()) if r is not None], stops

    @staticmethod
    def _add_logprobs(sample: _Sample, tok: int, lp: TokenLogprobs) -> None:
        chosen = lp.logprob
        sample.cumulative_logprob += chosen
        if sample.logprobs is not None:
            entry = {tok: Logprob(chosen)}
            for rank, (tid, val) in enumerate(zip(lp.top_ids, lp.top_logprobs), 1):
                entry.setdefault(tid, Logprob(val, rank))
                if tid == tok:
                    entry[tok].rank = rank
            sample.logprobs.append(entry)

    def _make_record(self, state: _RequestState) -> OutputRecord | None:
        """The request's output now, or None when there is nothing to hand out (FINAL_ONLY
        before the end)."""
        finished = state.finished
        if finished:
            state.metrics.finished_time = time.monotonic()
            self.remove([state.request_id])
        elif state.kind is OutputKind.FINAL_ONLY:
            return None
        delta = state.kind is OutputKind.DELTA
        with_logprobs = state.params.logprobs is not None
        completions = []
        for s in state.samples:
            text = s.detokenizer.output_text if s.detokenizer is not None else self._final_text(s, state.params)
            lps = s.logprobs
            if delta:
                text, ids = text[s.sent_text :], s.token_ids[s.sent_tokens :]  # slices: copies
                s.sent_text += len(text)
                s.sent_tokens += len(ids)
                if lps is not None:
                    lps = lps[s.sent_logprobs :]
                    s.sent_logprobs += len(lps)
            else:
                ids = list(s.token_ids)
            completions.append(CompletionRecord(s.index, text, ids, s.cumulative_logprob if with_logprobs else None,
                                                lps, s.finish_reason, s.stop_reason))
        m = state.metrics
        return OutputRecord(state.request_id, state.prompt, state.prompt_token_ids, finished, state.num_cached_tokens,
                            completions, state.prompt_logprobs, m.arrival_time, m.first_scheduled_time,
                            m.first_token_time, m.finished_time)

    def _final_text(self, sample: _Sample, params: SamplingParams) -> str:
        """The text of a finished sample decoded in one go (no incremental detokenizer)."""
        if self.tokenizer is None or sample.finish_reason is None:
            return ""
        ids = sample.token_ids
        if sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str):
            ids = ids[:-1]  # the EOS / stop token is not part of the text (as vLLM)
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
