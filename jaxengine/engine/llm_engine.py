"""Engine: the synchronous core loop with its outputs, in one process.

    out = core.step_core()                        # schedule -> run -> update: token ids
    records, stops = processor.process(out)       # detokenize, stop strings, logprobs
    core.stop_requests(stops)

`LLM` drives it in a loop for offline batches; `AsyncEngine` drives it from a thread for
streaming. The gRPC service runs the core alone in a process of its own and the output
processing in its front-end processes (jaxengine.engine.engine_process).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax

from jaxengine.config import EngineConfig
from jaxengine.engine.core import EngineCore, kv_storage_dtype
from jaxengine.engine.input_processor import Prompt
from jaxengine.engine.output_processor import OutputProcessor
from jaxengine.outputs import OutputKind, OutputRecord, RequestOutput
from jaxengine.sampling_params import SamplingParams
from models import CausalLM

__all__ = ["Engine", "kv_storage_dtype"]


class Engine(EngineCore):
    def __init__(
        self, config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Any = None, progress: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        super().__init__(config, model=model, tokenizer=tokenizer, progress=progress, mesh=mesh)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request (text or token ids); returns its id. Raises ValueError for input
        that can never run (empty, text that is not valid Unicode, too long, bad token ids,
        bad sampling parameters, n above max_n), TypeError for a prompt that is neither text
        nor token ids (bytes, say)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        text, ids = self.input_processor.prompt_token_ids(prompt)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.add_core_request(ids, params, request_id=request_id, priority=priority, arrival_time=arrival_time)
        self.processor.add(request_id, text, ids, params, output_kind, arrival_time)
        return request_id

    def step(self) -> list[RequestOutput]:
        """One engine iteration: the outputs of the requests it advanced (see step_records)."""
        return [RequestOutput.from_record(r) for r in self.step_records()]

    def step_records(self) -> list[OutputRecord]:
        """`step`, with its outputs as OutputRecords (see jaxengine.outputs)."""
        records, stops = self.processor.process(self.step_core())
        if stops:
            self.stop_requests(stops)
        return records
