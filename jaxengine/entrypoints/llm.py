"""The offline API: `LLM` (vLLM's shape) and `generate()` for research code."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from jaxengine.config import EngineConfig
from jaxengine.engine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine.input_processor import Prompt
from jaxengine.engine.llm_engine import Engine
from jaxengine.outputs import OutputKind, RequestOutput
from jaxengine.sampling_params import SamplingParams


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """The prompts as a list, and whether the caller passed several (a list of prompts)
    rather than one (text, or one list of token ids)."""
    if isinstance(prompts, (str, bytes, bytearray, memoryview)):
        return [prompts], False  # bytes: refused by the input processor, not read as token ids
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts], False
    return prompts, True


class LLM:
    """An engine for offline batches: `LLM(model).generate(prompts, params)`."""

    def __init__(self, model: str | None = None, *, progress: bool = True, **engine_args: Any):
        # data_parallel_size > 1: a DataParallelEngine (same interface, one Engine per replica).
        self.engine: Engine | DataParallelEngine = make_engine(EngineConfig.from_kwargs(model, **engine_args),
                                                               progress=progress)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order. A prompt that can never
        run raises ValueError (TypeError for one that is neither text nor token ids), naming
        its index in a list of prompts; nothing is left queued."""
        prompts, several = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = self._add_all(prompts, params, OutputKind.FINAL_ONLY, several)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate.
        `tools` (OpenAI's tool definitions, as in vLLM's `LLM.chat`) go to the template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.chat_token_ids(c, tools) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield deltas (new text and token ids) of one request as they are produced."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(prompt, sampling_params, request_id=rid, output_kind=OutputKind.DELTA)
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(rid)
                self.engine.step()

    def _add_all(self, prompts: list[Prompt], params: list[SamplingParams | None], kind: OutputKind,
                 name_index: bool) -> list[str]:
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    ids.append(self.engine.add_request(prompt, p, request_id=f"gen-{next(self._ids)}", output_kind=kind))
                except (TypeError, ValueError) as e:
                    if not name_index:
                        raise
                    raise (TypeError if isinstance(e, TypeError) else ValueError)(f"prompts[{i}]: {e}") from None
        except Exception:
            self.engine.abort_request(ids)  # nothing half-submitted stays behind
            self.engine.step()
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2) as bar:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update()
        return [results[i] for i in ids]


@functools.lru_cache(maxsize=2)
def _cached_llm(model: str | None, engine_args: tuple) -> LLM:
    return LLM(model, progress=False, **dict(engine_args))


def generate(
    prompts: Prompt | Sequence[Prompt],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    model: str | None = None,
    **engine_args: Any,
) -> list[RequestOutput]:
    """One call for research code: `jaxengine.generate(["def f(x):"], SamplingParams(max_tokens=32))`.
    The engine (loaded and compiled once) is kept for later calls with the same arguments;
    `model` defaults to the small code model shipped with the package."""
    llm = _cached_llm(model, tuple(sorted(engine_args.items())))
    return llm.generate(prompts, sampling_params, use_tqdm=False)
