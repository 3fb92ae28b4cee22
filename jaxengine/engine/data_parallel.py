"""Data parallelism: `data_parallel_size` independent engine replicas behind one interface.

The [dp, tp] mesh (models.sharding.make_mesh) is cut into its dp rows; each row runs a full
`Engine` (its own copy of the weights split over that row's tp devices, its own scheduler,
KV pool and prefix cache). `DataParallelEngine` has the Engine interface the front ends use
(`add_request`, `abort_request`, `step`, `has_unfinished_requests`, `stats`, `step_timing`,
`tokenizer`, and the EngineCore calls an engine process makes: `add_core_request`,
`stop_requests`, `step_core`), hands each new request to the next replica round-robin, and
steps every busy replica in turn. Each replica knows its own requests: a command about a
request goes to every replica, and those that do not have it ignore it. A replica's step only dispatches its device work and collects the previous step's
tokens, so while the host serves one replica the others' devices run: the replicas overlap
without threads. Requests never move between replicas (no cross-replica prefix sharing).

Why replicas rather than one SPMD program with the batch split over `dp`: the scheduler,
block tables and prefix cache are per KV pool, and independent replicas need no
cross-replica collective and no lock-step of batch shapes (each pads to its own bucket).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from jaxengine.config import EngineConfig
from jaxengine.engine.core_outputs import CoreOutputs
from jaxengine.engine.input_processor import Prompt
from jaxengine.engine.llm_engine import Engine
from jaxengine.engine.output_processor import StopMatch
from jaxengine.engine.step_timing import StepTiming
from jaxengine.outputs import OutputKind, OutputRecord, RequestOutput
from jaxengine.sampling_params import SamplingParams
from jaxengine.worker.kv_capacity import claim_device_memory
from models.sharding import make_mesh, replica_meshes


def _first_replica(name: str) -> property:
    return property(lambda self: getattr(self.replicas[0], name), doc=f"The replicas' {name} (the first one's).")


class DataParallelEngine:
    def __init__(self, config: EngineConfig, *, progress: bool = True):
        claim_device_memory(config.gpu_memory_utilization)  # before the mesh starts JAX's backends
        mesh = make_mesh(config.tensor_parallel_size, config.data_parallel_size)
        self.config = config
        self.mesh = mesh
        self.replicas = [Engine(config, progress=progress, mesh=m) for m in replica_meshes(mesh)]
        self._next = itertools.cycle(self.replicas)
        self._ids = itertools.count()
        # Live, for the loop that drives this engine (engine_process); see step_timing().
        self.timing = StepTiming()

    # What every replica shares: the first one's.
    tokenizer = _first_replica("tokenizer")
    model_config = _first_replica("model_config")
    max_model_len = _first_replica("max_model_len")
    dtype = _first_replica("dtype")
    kv_dtype = _first_replica("kv_dtype")

    @property
    def num_blocks(self) -> int:  # over all replicas (each has a pool of its own)
        return sum(e.num_blocks for e in self.replicas)

    def tokenize(self, prompt: str) -> list[int]:
        return self.replicas[0].tokenize(prompt)

    def chat_token_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.replicas[0].chat_token_ids(messages, tools)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, *,
        request_id: str | None = None, output_kind: OutputKind = OutputKind.CUMULATIVE, **kwargs: Any,
    ) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self._on_next_replica(request_id, lambda engine: engine.add_request(
            prompt, params, request_id=request_id, output_kind=output_kind, **kwargs))
        return request_id

    def add_core_request(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str,
                         **kwargs: Any) -> list[str]:
        return self._on_next_replica(request_id, lambda engine: engine.add_core_request(
            prompt_token_ids, params, request_id=request_id, **kwargs))

    def _on_next_replica(self, request_id: str, add: Callable[[Engine], Any]) -> Any:
        """Add a request to the next replica (round-robin)."""
        if any(request_id in engine.requests for engine in self.replicas):
            raise ValueError(f"request id {request_id!r} is already in use")
        return add(next(self._next))

    def stop_requests(self, stops: list[StopMatch]) -> None:
        for engine in self.replicas:
            engine.stop_requests(stops)

    def step_core(self) -> CoreOutputs:
        out = CoreOutputs()
        for engine in self.replicas:
            if engine.has_unfinished_requests():
                out.extend(engine.step_core())
        return out

    def abort_request(self, request_ids: str | list[str]) -> None:
        for engine in self.replicas:
            engine.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def step(self) -> list[RequestOutput]:
        return [RequestOutput.from_record(r) for r in self.step_records()]

    def step_records(self) -> list[OutputRecord]:
        records: list[OutputRecord] = []
        for engine in self.replicas:
            if engine.has_unfinished_requests():
                records += engine.step_records()
        return records

    def stats(self) -> dict[str, float]:
        per = [e.stats() for e in self.replicas]
        total = {k: sum(s[k] for s in per) for k in per[0]}
        total["kv_cache_usage"] = total["kv_cache_usage"] / len(per)  # mean over replicas
        return total

    def step_timing(self) -> StepTiming:
        """The replicas' step loops summed, with the loop around them (`timing`)."""
        return StepTiming.total([self.timing, *(e.timing for e in self.replicas)])

    def reset_prefix_cache(self) -> bool:
        return all([e.reset_prefix_cache() for e in self.replicas])

    def close(self) -> None:
        for engine in self.replicas:
            engine.close()


def make_engine(config: EngineConfig, *, progress: bool = True) -> Engine | DataParallelEngine:
    """One Engine, or a DataParallelEngine when config.data_parallel_size > 1."""
    if config.data_parallel_size > 1:
        return DataParallelEngine(config, progress=progress)
    return Engine(config, progress=progress)
