"""Engine: the synchronous core loop (schedule -> run -> update -> detokenize -> outputs).

    out = scheduler.schedule()
    sampled = runner.execute(runner.prepare(out))
    updated = scheduler.update(out, sampled)
    outputs = deliver(updated)          # detokenize, stop strings, logprobs

`LLM` drives it in a loop for offline batches; `AsyncEngine` drives it from a thread for
streaming and the gRPC service.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.config import EngineConfig
from jaxengine.detokenizer import IncrementalDetokenizer
from jaxengine.kv_capacity import claim_device_memory, kv_bytes_per_token, memory_budget, num_blocks_for_budget
from jaxengine.model_runner import ModelRunner
from jaxengine.outputs import Logprob, OutputKind, OutputRecord, RequestMetrics, RequestOutput
from jaxengine.request import Request, RequestStatus
from jaxengine.sampling_params import SamplingParams
from jaxengine.scheduler import Scheduler, SchedulerConfig
from jaxengine.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer
from models import PRESETS, CausalLM, ModelConfig, load_model, random_model
from models.sharding import DP, TP, make_mesh

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass
class _Sample:
    """Host-side state of one of a request's n samples."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
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

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.samples)


def _attention_fn(use_pallas: bool | None):
    """None: the model's default (the Pallas kernel on GPU, the jnp reference elsewhere)."""
    if use_pallas is None:
        return None
    import pallas_kernels

    return pallas_kernels.ragged_paged_attention if use_pallas else pallas_kernels.ragged_paged_attention_reference


def kv_storage_dtype(dtype) -> jnp.dtype:
    """The KV cache's dtype for a model computing in `dtype`. On XLA:CPU a 16-bit cache is
    kept in float32: XLA:CPU upcasts a bf16/f16 gather or scatter by converting its whole
    operand, i.e. the whole cache of every layer on every step (8.6x slower steps on the dev
    VM for a bf16 tiny Llama). float32 holds the same 16-bit values exactly, so the outputs
    are unchanged; the fixed CPU byte budget then holds half the tokens."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


def _valid_token_ids(ids: list, vocab: int) -> bool:
    """All of `ids` are integers in [0, vocab): one vectorised check instead of a Python loop."""
    try:
        arr = np.asarray(ids)
    except ValueError:  # ragged nesting
        return False
    return arr.ndim == 1 and arr.dtype.kind in "iu" and int(arr.min()) >= 0 and int(arr.max()) < vocab


class Engine:
    def __init__(
        self, config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Any = None, progress: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`mesh`: the [dp=1, tp] device mesh this engine runs on (default: built from
        config.tensor_parallel_size; None when it is 1: everything on the first device).
        data_parallel_size > 1 is several engines: see jaxengine.data_parallel."""
        claim_device_memory(config.gpu_memory_utilization)  # before anything starts JAX's backends
        config.resolve_platform_defaults()
        self.config = config
        if mesh is None and config.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: one Engine is one replica; use jaxengine.LLM "
                "or jaxengine.data_parallel.DataParallelEngine, which run one Engine per replica"
            )
        if mesh is None and config.tensor_parallel_size > 1:
            mesh = make_mesh(config.tensor_parallel_size)
        if mesh is not None and (mesh.shape[DP], mesh.shape[TP]) != (1, config.tensor_parallel_size):
            raise ValueError(
                f"an engine's mesh must be [dp=1, tp={config.tensor_parallel_size}], got {dict(mesh.shape)}"
            )
        self.mesh = mesh
        if config.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        self.model_config, model, self.tokenizer = self._load(config, model, tokenizer, mesh)
        mcfg = self.model_config
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, 8192)
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                f"{mcfg.max_position_embeddings}; lower max_model_len"
            )
        self.dtype = jax.tree.leaves(model)[0].dtype  # the weights' and activations'
        self.kv_dtype = kv_storage_dtype(self.dtype)
        max_batched = max(config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = ModelRunner(
            model, num_blocks=None, block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
            kv_dtype=self.kv_dtype, attention_fn=_attention_fn(config.use_pallas), mesh=mesh,
        )
        self.num_blocks = self._num_kv_blocks()
        if jax.process_count() > 1:  # every process must allocate the same cache
            from jax.experimental import multihost_utils

            self.num_blocks = int(multihost_utils.broadcast_one_to_all(np.int32(self.num_blocks)))
        # Several processes with the host loop on process 0 only: it broadcasts every step to
        # the others, which run `follow()` (jaxengine.multihost).
        self._leader = None
        self._execute = self.runner.execute
        if config.host_loop_on_process_zero and jax.process_count() > 1 and jax.process_index() == 0:
            from jaxengine.multihost import Leader

            self._leader = Leader(self.runner)
            self._execute = self._leader.execute
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_batched,
            max_model_len=self.max_model_len, block_size=config.block_size, num_blocks=self.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching, policy=config.scheduling_policy,
        ))
        self.compile_seconds = self.runner.warmup(self.num_blocks, progress)  # allocates the KV cache
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: no long GC pauses mid-run
        # The model's EOS ids (config.json / generation_config) and the tokenizer's, like vLLM.
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config.eos_token_ids) if self.tokenizer \
            else tuple(self.model_config.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._seeds: dict[str, int] = {}  # child request id -> sampling seed
        self._states: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, str] = {}
        self._ids = itertools.count()
        self._aborted: list[str] = []  # parents whose final output is still to be delivered
        self._in_flight = None  # (SchedulerOutput, StepInputs, results) dispatched, not yet collected
        self._num_penalised = 0  # live requests with penalties: they need synchronous steps
        # critical: from collecting a step to dispatching the next (the device surely idles);
        # host_bound_steps: steps whose result was ready before the host came for it.
        self.timing = {"critical_seconds": 0.0, "wait_seconds": 0.0, "loop_seconds": 0.0, "steps": 0, "host_bound_steps": 0}

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _load(config: EngineConfig, model: CausalLM | None, tokenizer: Any, mesh: jax.sharding.Mesh | None):
        if model is not None:
            return model.config, model, tokenizer  # the runner places it on the mesh
        if config.model in PRESETS:
            dtype = _DTYPES["bfloat16" if config.dtype == "auto" else config.dtype]
            model = random_model(config.model, dtype, seed=config.seed, mesh=mesh)
            return model.config, model, tokenizer
        mcfg = ModelConfig.from_pretrained(config.model)
        name = config.dtype if config.dtype != "auto" else (mcfg.torch_dtype or "bfloat16")
        if name not in _DTYPES:
            name = "bfloat16"
        model = load_model(config.model, _DTYPES[name], mesh=mesh)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(config.tokenizer or config.model)
            except (FileNotFoundError, ValueError, OSError) as e:
                log.warning("no tokenizer (%s): token ids in and out only", e)
        return mcfg, model, tokenizer

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        # Per device: with tensor parallelism each device holds num_kv_heads / tp heads of every
        # block, so the budget (and kv_cache_bytes) is one device's.
        tp = 1 if self.mesh is None else self.mesh.shape[TP]
        per_token = kv_bytes_per_token(
            num_layers=self.model_config.num_layers, num_kv_heads=self.model_config.num_kv_heads // tp,
            head_dim=self.model_config.head_dim, dtype=self.kv_dtype,
        )
        device = jax.local_devices()[0] if self.mesh is None else self.mesh.local_devices[0]
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            # Weights are resident already; subtract the largest step's activations, measured
            # from its compiled program.
            self.activation_peak_bytes = self.runner.profile_peak_bytes()
            budget = memory_budget(stats["bytes_limit"], stats.get("bytes_in_use", 0), self.activation_peak_bytes,
                                   cfg.gpu_memory_utilization)
        else:
            budget = cfg.kv_cache_bytes
        return num_blocks_for_budget(int(budget), cfg.block_size, per_token)

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompt_token_ids instead of text")
        return self.tokenizer.encode(prompt)

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat messages cannot be rendered")
        return apply_chat_template(self.tokenizer, messages)

    def add_request(
        self,
        prompt: str | list[int] | None,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request (text or token ids); returns its id. Raises ValueError for input
        that can never run (empty, too long, bad token ids, bad sampling parameters)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenize(prompt)
        else:
            text, ids = None, list(prompt or [])
        vocab = self.model_config.vocab_size
        if ids and not _valid_token_ids(ids, vocab):  # the slow scan only to name the bad ids
            bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {bad[:5]}")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        root = Request(request_id, ids, params, arrival_time=arrival_time, priority=priority, eos_token_id=self.eos_token_ids)
        children = root.fan_out() if params.n > 1 else [root]
        added = []
        try:
            for child in children:
                self.scheduler.add_request(child)
                added.append(child)
        except ValueError:
            self.scheduler.finish_requests([c.request_id for c in added])
            raise
        if params.has_penalties:
            self._num_penalised += 1  # back to 0 when the request's state is dropped
        samples = []
        for child in children:
            seed = child.sampling_params.seed
            self._seeds[child.request_id] = self._rng.getrandbits(32) if seed is None else seed
            self._child_to_parent[child.request_id] = request_id
            detok = None
            # Streams and stop strings need text every step; a plain offline request is
            # decoded once when it finishes (saves ~12 us per token on the host loop).
            if self.tokenizer is not None and (params.stop or output_kind is not OutputKind.FINAL_ONLY):
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                    stop=list(params.stop or []), include_stop_str_in_output=params.include_stop_str_in_output,
                    min_tokens=params.min_tokens,
                )
            samples.append(_Sample(child, detok, logprobs=[] if params.logprobs is not None else None))
        self._states[request_id] = _RequestState(
            request_id, text, ids, params, output_kind, samples, RequestMetrics(root.arrival_time),
            prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(ids),
        )
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort at any time; blocks are freed now, a final output comes with the next step."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self._states.get(rid)
            if state is None:
                continue
            self.scheduler.finish_requests([s.request.request_id for s in state.samples], RequestStatus.FINISHED_ABORTED)
            for s in state.samples:
                if s.detokenizer is not None:
                    s.detokenizer.flush()
            self._aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self._states) or self._in_flight is not None

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """One engine iteration: the outputs of the requests it advanced (see step_records)."""
        return [RequestOutput.from_record(r) for r in self.step_records()]

    def step_records(self) -> list[OutputRecord]:
        """`step`, with its outputs as OutputRecords (what EngineProcess sends across its pipe).
        One engine iteration. With async scheduling (the default) the next step is
        scheduled and dispatched before the running one's tokens are collected, so the host's
        work hides behind the device's; steps fall back to `_step_sync` when nothing is in
        flight or a running request uses penalties (they need every token on the host)."""
        if self.config.async_scheduling and self._in_flight is not None and not self._num_penalised:
            return self._step_async()
        return self._step_sync()

    def _step_async(self) -> list[OutputRecord]:
        """Schedule and dispatch step N+1 while N runs (its sampled tokens are fed to N+1
        on the device), then collect N. A request that ends at N (EOS, stop token, length,
        stop string) has already been given one more token in N+1: update() drops it."""
        t0 = time.perf_counter()
        prev_out, prev_inputs, (prev_result, prev_prompt) = self._in_flight
        nxt = self.scheduler.schedule()
        new = None
        if nxt.scheduled:
            prev_rows = {s.request.request_id: i for i, s in enumerate(prev_out.scheduled) if s.sample}
            inputs = self.runner.prepare(nxt, self._seeds, prev_rows)
            new = (nxt, inputs, self._execute(inputs, prev_result.token_ids))
            self._mark_scheduled(nxt)
        t_dispatch = time.perf_counter()
        token_ids = np.asarray(prev_result.token_ids)  # waits for step N
        wait = time.perf_counter() - t_dispatch
        if wait < 1e-4:  # N was done before N+1 was queued: the device may have idled
            self.timing["host_bound_steps"] += 1
            self.timing["critical_seconds"] += t_dispatch - t0
        self.timing["wait_seconds"] += wait
        sampled = {s.request.request_id: [int(token_ids[i])] for i, s in enumerate(prev_out.scheduled) if s.sample}
        updated = self.scheduler.update(prev_out, sampled)
        self._in_flight = new
        outputs = self._process((prev_out, prev_inputs, prev_result, prev_prompt, updated))
        self.timing["loop_seconds"] += time.perf_counter() - t0
        return outputs

    def _mark_scheduled(self, out) -> None:
        self.timing["steps"] += 1
        now = time.monotonic()
        for s in out.scheduled:
            if s.is_new:  # admitted this step (or resumed after preemption)
                m = self._states[self._child_to_parent[s.request.request_id]].metrics
                m.first_scheduled_time = m.first_scheduled_time or now

    def _step_sync(self) -> list[OutputRecord]:
        """One iteration, pipelined so the device never waits for output processing:
        collect the step in flight, schedule and dispatch the next one, and only then turn
        the collected tokens into outputs (detokenize, stop strings, logprobs) while the
        device runs. A stop string therefore ends a request one step late: the extra
        token it got in the step already dispatched is dropped by `scheduler.update`."""
        t0 = time.perf_counter()
        done = None
        if self._in_flight is not None:
            out, inputs, (result, prompt_lp) = self._in_flight
            self._in_flight = None
            token_ids = np.asarray(result.token_ids)  # waits for the device
            t_ready = time.perf_counter()
            wait = t_ready - t0
            self.timing["wait_seconds"] += wait
            self.timing["host_bound_steps"] += wait < 1e-4  # the device finished before we looked
            sampled = {s.request.request_id: [int(token_ids[i])] for i, s in enumerate(out.scheduled) if s.sample}
            done = (out, inputs, result, prompt_lp, self.scheduler.update(out, sampled))
        else:
            t_ready = t0
        nxt = self.scheduler.schedule()
        if nxt.scheduled:
            inputs = self.runner.prepare(nxt, self._seeds)
            self._in_flight = (nxt, inputs, self._execute(inputs))
            self.timing["critical_seconds"] += time.perf_counter() - t_ready
            self._mark_scheduled(nxt)
        outputs = self._process(done)
        self.timing["loop_seconds"] += time.perf_counter() - t0
        return outputs

    def _process(self, done) -> list[OutputRecord]:
        touched: dict[str, _RequestState] = {}
        if done is not None:
            out, inputs, result, prompt_lp, updated = done
            if prompt_lp is not None:
                self._deliver_prompt_logprobs(inputs, jax.tree.map(np.asarray, prompt_lp))
            rows = {s.request.request_id: i for i, s in enumerate(out.scheduled)}
            host = None
            if any(self._states[self._child_to_parent[r.request_id]].params.logprobs is not None for r in updated):
                host = jax.tree.map(np.asarray, result)
            now = time.monotonic()
            for req in updated:
                state = self._states[self._child_to_parent[req.request_id]]
                self._deliver_token(state, state.samples[req.sample_index], req, host, rows[req.request_id])
                state.metrics.first_token_time = state.metrics.first_token_time or now
                if req.is_finished or state.kind is not OutputKind.FINAL_ONLY:  # else nothing to hand out yet
                    touched[state.request_id] = state
        for rid in self._aborted:
            if rid in self._states:
                touched[rid] = self._states[rid]
        self._aborted.clear()
        return [r for r in (self._make_record(st) for st in touched.values()) if r is not None]

    def _deliver_prompt_logprobs(self, inputs, lp) -> None:
        """vLLM's shape: per prompt position, {token: Logprob} for the actual token and the
        top-k; position 0 stays None (nothing predicts the first token)."""
        for r, (child_id, pos) in enumerate(inputs.prompt_slots):
            state = self._states.get(self._child_to_parent.get(child_id, ""))
            if state is None:  # aborted meanwhile
                continue
            k = state.params.prompt_logprobs
            target = int(inputs.prompt_targets[r])
            entry = {target: Logprob(float(lp.logprobs[r]))}
            for rank, (tid, val) in enumerate(zip(lp.top_ids[r], lp.top_logprobs[r]), 1):
                if int(tid) == target:
                    entry[target].rank = rank
                elif rank <= k:
                    entry[int(tid)] = Logprob(float(val), rank)
            state.prompt_logprobs[pos] = entry

    def _deliver_token(self, state: _RequestState, sample: _Sample, req: Request, host, row: int) -> None:
        tok = req.output_token_ids[-1]
        detok = sample.detokenizer
        if detok is not None:
            # Stop strings are matched below, so FINISHED_STOPPED here means EOS or a stop
            # token id: that token is not part of the text (as vLLM).
            stopped_by_token = req.status == RequestStatus.FINISHED_STOPPED
            _, stop = detok.update([] if stopped_by_token else [tok])
            if stop is not None:
                if not req.is_finished:
                    self.scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
                else:
                    req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
            elif req.is_finished:
                detok.flush()  # release text held back for a possible stop string
        if host is not None:
            sample.cumulative_logprob += float(host.logprobs[row])
            if sample.logprobs is not None:
                entry = {tok: Logprob(float(host.logprobs[row]))}
                for rank, (tid, lp) in enumerate(zip(host.top_ids[row][: state.params.logprobs], host.top_logprobs[row]), 1):
                    entry.setdefault(int(tid), Logprob(float(lp), rank))
                    if int(tid) == tok:
                        entry[tok].rank = rank
                sample.logprobs.append(entry)

    def _make_record(self, state: _RequestState) -> OutputRecord | None:
        """The request's output now (an OutputRecord, see jaxengine.outputs), or None when
        there is nothing to hand out (FINAL_ONLY before the end)."""
        finished = state.finished
        if finished:
            state.metrics.finished_time = time.monotonic()
            del self._states[state.request_id]
            if state.params.has_penalties:
                self._num_penalised -= 1
            for s in state.samples:
                self._seeds.pop(s.request.request_id, None)
                self._child_to_parent.pop(s.request.request_id, None)
        if state.kind is OutputKind.FINAL_ONLY and not finished:
            return None
        delta = state.kind is OutputKind.DELTA
        with_logprobs = state.params.logprobs is not None
        completions = []
        for i, s in enumerate(state.samples):
            req = s.request
            text = s.detokenizer.output_text if s.detokenizer is not None else self._final_text(req)
            lps = s.logprobs
            if delta:
                text, ids = text[s.sent_text :], req.output_token_ids[s.sent_tokens :]  # slices: copies
                s.sent_text += len(text)
                s.sent_tokens += len(ids)
                if lps is not None:
                    lps = lps[s.sent_logprobs :]
                    s.sent_logprobs += len(lps)
            else:
                ids = list(req.output_token_ids)
            completions.append((i, text, ids, s.cumulative_logprob if with_logprobs else None, lps,
                                req.status.finish_reason, req.stop_reason))
        num_cached = max(s.request.num_cached_tokens for s in state.samples)
        m = state.metrics
        return [state.request_id, state.prompt, state.prompt_token_ids, finished, max(num_cached, 0),
                (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time), completions,
                state.prompt_logprobs]

    def _final_text(self, req: Request) -> str:
        """The text of a finished request decoded in one go (no incremental detokenizer)."""
        if self.tokenizer is None:
            return ""
        ids = req.output_token_ids
        if req.status == RequestStatus.FINISHED_STOPPED and not isinstance(req.stop_reason, str):
            ids = ids[:-1]  # the EOS / stop token is not part of the text (as vLLM)
        return self.tokenizer.decode(ids, skip_special_tokens=req.sampling_params.skip_special_tokens)

    # ------------------------------------------------------------------ several processes

    def follow(self) -> int:
        """Processes other than 0, with host_loop_on_process_zero: replay process 0's steps
        until it calls close(); returns the number of steps run."""
        if not self.config.host_loop_on_process_zero or jax.process_index() == 0:
            raise RuntimeError("follow() is for processes 1..N-1 with host_loop_on_process_zero=True")
        from jaxengine.multihost import follow

        return follow(self.runner)

    def close(self) -> None:
        """Abort what is left, collect the step in flight, and (process 0 of several)
        release the followers' loops."""
        self.abort_request(list(self._states))
        while self._in_flight is not None:
            self.step()
        if self._leader is not None:
            self._leader.stop()
            self._leader = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (as vLLM's `reset_prefix_cache`): benchmarks start runs
        cold. Only when no block is in use; returns whether it was reset."""
        return self.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        s = self.scheduler.make_stats()
        return dataclasses.asdict(s)
