"""EngineCore: requests in as token ids, each step's new token ids out.

    out = scheduler.schedule()
    sampled = runner.execute(runner.prepare(out))
    updated = scheduler.update(out, sampled)
    -> CoreOutputs: request ids, their new tokens, what finished (columns)

No text and no RequestOutputs here: turning tokens into outputs (detokenizing, stop strings,
logprob dicts, deltas) is `OutputProcessor`'s, run by `Engine` in this process or by each
front-end process (`jaxengine.engine.engine_process.EngineClient`). This is vLLM V1's split of its
EngineCore from its output processor: a 1B step on an H200 is host-bound, so output work
on the step loop (1.3 ms a step for streamed outputs, more with detokenization) slowed
every step; in front-end processes it runs beside the steps.

What is not the step loop lives beside its data: loading (`jaxengine.engine.loading`), KV
sizing (`jaxengine.worker.kv_sizing`), request checks (`InputProcessor`), the requests and
their n > 1 samples (`jaxengine.core.request_table.CoreRequests`), and whether a step may be
a multi-step decode (`Scheduler.decode_steps`).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxengine.config import EngineConfig
from jaxengine.core.request import Request
from jaxengine.core.request_table import CoreRequests
from jaxengine.core.sched.output import SchedulerOutput
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig
from jaxengine.engine.core_outputs import CoreOutputs, Finish, FirstScheduled, PromptLogprobs, TokenLogprobs
from jaxengine.engine.input_processor import InputProcessor
from jaxengine.engine.loading import engine_mesh, load_model_and_tokenizer, resolve_max_model_len
from jaxengine.engine.output_processor import StopMatch
from jaxengine.engine.step_timing import StepTiming
from jaxengine.engine.tokenizer import apply_chat_template
from jaxengine.outputs import Logprob
from jaxengine.sampling_params import SamplingParams
from jaxengine.structured_output.manager import StructuredOutputManager
from jaxengine.worker.attention_backend import attention_fn
from jaxengine.worker.compilation import use_persistent_compilation_cache
from jaxengine.worker.kv_capacity import claim_device_memory, kv_storage_dtype
from jaxengine.worker.kv_sizing import size_kv_cache
from jaxengine.worker.model_runner import ModelRunner
from jaxengine.worker.step_inputs import PromptLogprobArrays, StepInputs
from models import CausalLM

__all__ = ["CoreOutputs", "EngineCore", "kv_storage_dtype"]


class _InFlight(NamedTuple):
    """A step dispatched to the device, not yet collected."""

    out: SchedulerOutput
    inputs: StepInputs
    result: Any  # the runner's sampled tokens (and logprobs), on the device
    prompt_logprobs: Any  # the runner's prompt logprobs on the device, or None


class _Deferred(NamedTuple):
    """A step with constrained rows whose forward is dispatched and whose sampler waits for the
    grammar masks, which need the tokens of the step before it."""

    out: SchedulerOutput
    inputs: StepInputs
    logits: Any  # [S, V] on the device
    prompt_logprobs: Any


class _Collected(NamedTuple):
    """A step whose tokens are back on the host and applied by the scheduler."""

    step: _InFlight
    updated: list[Request]  # requests that got tokens or finished
    # A multi-step decode: each request's output length before the run's tokens; else None.
    before: dict[str, int] | None


class EngineCore:
    def __init__(
        self, config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Any = None, progress: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`mesh`: the [dp=1, tp] device mesh this engine runs on (default: built from
        config.tensor_parallel_size; None when it is 1: everything on the first device).
        data_parallel_size > 1 is several engines: see jaxengine.engine.data_parallel."""
        if config.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not implemented yet (the paged attention "
                             "kernels read the KV cache in the model's dtype only); use kv_cache_dtype='auto'")
        claim_device_memory(config.gpu_memory_utilization)  # before anything starts JAX's backends
        config.resolve_platform_defaults()
        self.config = config
        self.mesh = mesh = engine_mesh(config, mesh)
        if config.compilation_cache_dir:
            use_persistent_compilation_cache(config.compilation_cache_dir)
        loaded = load_model_and_tokenizer(config, model=model, tokenizer=tokenizer, mesh=mesh)
        self.model_config, model, self.tokenizer = loaded.config, loaded.model, loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        # The activations' (and unquantized weights') dtype; a quantized model's linears hold 8-bit weights.
        self.dtype = model.model.embed_tokens.weight.get_value().dtype
        self.kv_dtype = kv_storage_dtype(self.dtype)
        self.runner = ModelRunner(
            model, num_blocks=None, block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_dtype=self.kv_dtype, attention_fn=attention_fn(config.use_pallas, config.prefill_attention_body), mesh=mesh,
            num_scheduler_steps=config.num_scheduler_steps,
            sequence_parallel_min_tokens=config.sequence_parallel_min_tokens,
        )
        self.num_blocks, self.activation_peak_bytes = size_kv_cache(
            model_config=self.model_config, kv_dtype=self.kv_dtype, block_size=config.block_size, mesh=mesh,
            profile_peak_bytes=self.runner.profile_peak_bytes, gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_bytes=config.kv_cache_bytes, num_kv_blocks=config.num_kv_blocks,
        )
        # Several processes with the host loop on process 0 only: it broadcasts every step to
        # the others, which run `follow()` (jaxengine.worker.multihost).
        self._leader = None
        self._execute = self.runner.execute
        if config.host_loop_on_process_zero and jax.process_count() > 1 and jax.process_index() == 0:
            from jaxengine.worker.multihost import Leader

            self._leader = Leader(self.runner)
            self._execute = self._leader.execute
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, block_size=config.block_size, num_blocks=self.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching, policy=config.scheduling_policy,
        ))
        # Allocates the KV cache.
        self.compile_seconds = self.runner.warmup(self.num_blocks, progress, config.compile_threads)
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: no long GC pauses mid-run
        self.input_processor = InputProcessor(tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
                                              max_model_len=self.max_model_len, max_n=config.max_n)
        self.requests = CoreRequests(self.scheduler, config.seed)
        self._seeds = self.requests.seeds  # sample id -> sampling seed, read by the runner
        # The multi-host leader broadcasts single steps only (jaxengine.worker.multihost).
        self._max_steps = 1 if self._leader is not None else config.num_scheduler_steps
        self._scheduled: dict[str, FirstScheduled] = {}  # for the next output
        self._in_flight: _InFlight | None = None
        self._structured: StructuredOutputManager | None = None  # made by the first constrained request
        # Live: the loop that drives this engine adds its own (engine_process); see step_timing().
        self.timing = StepTiming()

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str) -> list[int]:
        return self.input_processor.prompt_token_ids(prompt)[1]

    def chat_token_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """`messages` (and the request's `tools`, if any) rendered by the tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat messages cannot be rendered")
        return apply_chat_template(self.tokenizer, messages, tools=tools)

    def add_core_request(
        self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str, priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Queue a request of token ids; returns its samples' ids (its own when n == 1).
        Raises ValueError for input that can never run (empty, too long, bad token ids,
        bad sampling parameters, n above max_n)."""
        self.input_processor.check_request(prompt_token_ids, params)
        grammar = None
        if params.structured_outputs is not None:
            manager = self.structured_outputs()
            spec = manager.request(params.structured_outputs)  # ValueError: the backend's message
            grammar = lambda: manager.grammar_request(spec)  # noqa: E731  (one matcher per sample)
        return self.requests.add(Request(request_id, prompt_token_ids, params, arrival_time=arrival_time,
                                         priority=priority, eos_token_id=self.eos_token_ids), grammar)

    def structured_outputs(self) -> StructuredOutputManager:
        """The grammar backend, its cache and compile threads (made once, on first use: an engine
        that never sees a constrained request never builds the tokenizer's grammar tables)."""
        if self._structured is None:
            if self._leader is not None:
                raise ValueError("structured outputs are not supported with host_loop_on_process_zero yet")
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this model has none")
            self._structured = StructuredOutputManager(
                self.config.structured_outputs_backend, self.tokenizer, self.model_config.vocab_size,
                self.eos_token_ids, compile_threads=2,
                disable_any_whitespace=self.config.structured_outputs_disable_any_whitespace)
        return self._structured

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (ids as added) at any time; blocks are freed now, the finish is
        in the next step's outputs."""
        self.requests.abort([request_ids] if isinstance(request_ids, str) else request_ids)

    def stop_requests(self, stops: list[StopMatch]) -> None:
        """Finish samples whose text matched a stop string."""
        for match in stops:
            self.requests.stop(match.sample_id, match.stop)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._in_flight is not None

    # ------------------------------------------------------------------ one step

    def step_core(self) -> CoreOutputs:
        """One engine iteration. With async scheduling (the default) the next step is
        scheduled and dispatched before the running one's tokens are collected, so the host's
        work hides behind the device's; steps fall back to `_step_sync` when nothing is in
        flight or a running request uses penalties (they need every token on the host)."""
        t0 = time.perf_counter()
        if self.config.async_scheduling and self._in_flight is not None and not self.requests.num_penalised:
            collected = self._step_async()
        else:
            collected = self._step_sync()
        out = self._outputs(collected)
        self.timing.loop_seconds += time.perf_counter() - t0
        return out

    def step_timing(self) -> StepTiming:
        """Where the host's time went so far (a copy)."""
        return self.timing.copy()

    def _step_async(self) -> _Collected:
        """Schedule and dispatch step N+1 while N runs (its sampled tokens are fed to N+1
        on the device), then collect N. A request that ends at N (EOS, stop token, length,
        stop string) has already been given one more token (run) in N+1: update() drops it."""
        t0 = time.perf_counter()
        prev = self._in_flight
        prev_out, prev_result = prev.out, prev.result
        nxt = self.scheduler.schedule(self.scheduler.decode_steps(self._max_steps))
        new = deferred = None
        if nxt.scheduled:
            prev_rows = {s.request.request_id: i for i, s in enumerate(prev_out.scheduled) if s.sample}
            inputs = self.runner.prepare(nxt, self._seeds, prev_rows)
            # N+1 continues from N's (last step's) tokens, one row per request.
            if self.requests.num_constrained and nxt.num_steps == 1:
                # Its grammar masks need N's tokens: only the forward goes now, the sampler after.
                deferred = _Deferred(nxt, inputs, *self.runner.run_forward(inputs, prev_result.token_ids))
            else:
                new = _InFlight(nxt, inputs, *self._dispatch(inputs, nxt.num_steps, prev_result.token_ids))
            self._mark_scheduled(nxt)
        t_dispatch = time.perf_counter()
        sampled, before = self._collect(prev_out, prev_result)  # waits for step N
        wait = time.perf_counter() - t_dispatch
        timing = self.timing
        if wait < 1e-4:  # N was done before N+1 was queued: the device may have idled
            timing.host_bound_steps += 1
            timing.critical_seconds += t_dispatch - t0
        timing.wait_seconds += wait
        updated = self.scheduler.update(prev_out, sampled)  # matchers advance by N's tokens
        if deferred is not None:  # while N+1's forward runs on the device
            mask = self._grammar_bitmask(deferred.out, deferred.inputs)
            new = _InFlight(deferred.out, deferred.inputs,
                            self.runner.run_sampler(deferred.logits, deferred.inputs, mask), deferred.prompt_logprobs)
        self._in_flight = new
        return _Collected(prev, updated, before)

    def _step_sync(self) -> _Collected | None:
        """One iteration, pipelined so the device never waits for output processing:
        collect the step in flight, schedule and dispatch the next one, and only then hand
        the collected tokens out while the device runs. A stop string therefore ends a
        request one step late: the extra token it got in the step already dispatched is
        dropped by `scheduler.update`."""
        t0 = time.perf_counter()
        done = None
        if (prev := self._in_flight) is not None:
            self._in_flight = None
            sampled, before = self._collect(prev.out, prev.result)  # waits for the device
            t_ready = time.perf_counter()
            wait = t_ready - t0
            self.timing.wait_seconds += wait
            self.timing.host_bound_steps += wait < 1e-4  # the device finished before we looked
            done = _Collected(prev, self.scheduler.update(prev.out, sampled), before)
        else:
            t_ready = t0
        nxt = self.scheduler.schedule(self.scheduler.decode_steps(self._max_steps))
        if nxt.scheduled:
            inputs = self.runner.prepare(nxt, self._seeds)
            if self.requests.num_constrained and nxt.num_steps == 1:
                mask = self._grammar_bitmask(nxt, inputs)
                self._in_flight = _InFlight(nxt, inputs, *self.runner.execute(inputs, None, mask))
            else:
                self._in_flight = _InFlight(nxt, inputs, *self._dispatch(inputs, nxt.num_steps))
            self.timing.critical_seconds += time.perf_counter() - t_ready
            self._mark_scheduled(nxt)
        elif self._structured is not None and self.scheduler.waiting:  # maybe all wait for grammars
            self._structured.wait_for_compiles(0.01)
        return done

    def _grammar_bitmask(self, out: SchedulerOutput, inputs: StepInputs) -> np.ndarray | None:
        """The step's packed token bitmask (None: no constrained row samples), from matchers
        that have accepted every token before this step."""
        t0 = time.perf_counter()
        mask = self._structured.bitmask(out.scheduled, len(inputs.sampling.temperature))
        self.timing.grammar_mask_seconds += time.perf_counter() - t0
        return mask

    def _dispatch(self, inputs: StepInputs, num_steps: int, prev_tokens: jax.Array | None = None) -> tuple[Any, Any]:
        """Run a step (or a multi-step decode) on the device: the runner's (result, prompt
        logprobs), the last two fields of an _InFlight."""
        if num_steps > 1:
            self.timing.multi_step_runs += 1
            return self.runner.execute_multi(inputs, num_steps, prev_tokens), None
        return self._execute(inputs) if prev_tokens is None else self._execute(inputs, prev_tokens)

    @staticmethod
    def _collect(out: SchedulerOutput, result: Any) -> tuple[dict[str, list[int]], dict[str, int] | None]:
        """A dispatched step's sampled tokens per request (waits for the device), and for a
        multi-step decode each request's output length before them."""
        if out.num_steps == 1:
            token_ids = np.asarray(result.token_ids)
            return {s.request.request_id: [int(token_ids[i])] for i, s in enumerate(out.scheduled) if s.sample}, None
        columns = np.asarray(result.all_token_ids).T.tolist()  # [num_steps, S_max]: a column per request
        sampled = {s.request.request_id: columns[i] for i, s in enumerate(out.scheduled)}
        return sampled, {s.request.request_id: len(s.request.output_token_ids) for s in out.scheduled}

    def _mark_scheduled(self, out: SchedulerOutput) -> None:
        self.timing.steps += out.num_steps
        now = time.monotonic()
        for s in out.scheduled:
            req = s.request
            if s.is_new and not req.num_preemptions:  # admitted this step for the first time
                self._scheduled[req.request_id] = FirstScheduled(now, max(req.num_cached_tokens, 0))

    def _outputs(self, collected: _Collected | None) -> CoreOutputs:
        """A collected step (or None) as CoreOutputs, with what finished outside it."""
        out = CoreOutputs(scheduled=self._scheduled)
        self._scheduled = {}
        requests = self.requests
        finished = requests.take_finished_outside()
        if collected is not None:
            step, updated, before = collected
            if step.prompt_logprobs is not None:
                out.prompt_logprobs = self._prompt_logprobs(step.inputs, jax.tree.map(np.asarray, step.prompt_logprobs))
            host = None
            if any(r.sampling_params.logprobs is not None for r in updated):
                host = jax.tree.map(np.asarray, step.result)
                rows = {s.request.request_id: i for i, s in enumerate(step.out.scheduled)}
            req_ids, token_ids = out.req_ids, out.token_ids
            for req in updated:  # one new token each (several after a multi-step decode)
                if before is None:
                    req_ids.append(req.request_id)
                    token_ids.append(req.output_token_ids[-1])
                else:
                    new = req.output_token_ids[before[req.request_id]:]
                    req_ids += [req.request_id] * len(new)
                    token_ids += new
                if req.is_finished:
                    finished.append(req)
                k = req.sampling_params.logprobs
                if host is not None and k is not None:
                    row = rows[req.request_id]
                    out.logprobs[req.request_id] = TokenLogprobs(
                        float(host.logprobs[row]), host.top_ids[row][:k].tolist(), host.top_logprobs[row][:k].tolist())
        for req in finished:
            out.finished[req.request_id] = Finish(int(req.status), req.stop_reason)
            if (done := requests.finish(req)) is not None:
                out.done.append(done)
        return out

    def _prompt_logprobs(self, inputs: StepInputs, lp: PromptLogprobArrays) -> list[PromptLogprobs]:
        """vLLM's shape: per prompt position, {token: Logprob} for the actual token and the
        top-k; position 0 stays None (nothing predicts the first token)."""
        entries = []
        for r, (sid, pos) in enumerate(inputs.prompt_slots):
            req = self.requests.sample(sid)
            if req is None:  # finished meanwhile
                continue
            k = req.sampling_params.prompt_logprobs
            target = int(inputs.prompt_targets[r])
            entry = {target: Logprob(float(lp.logprobs[r]))}
            for rank, (tid, val) in enumerate(zip(lp.top_ids[r], lp.top_logprobs[r]), 1):
                if int(tid) == target:
                    entry[target].rank = rank
                elif rank <= k:
                    entry[int(tid)] = Logprob(float(val), rank)
            entries.append(PromptLogprobs(sid, pos, entry))
        return entries

    # ------------------------------------------------------------------ several processes

    def follow(self) -> int:
        """Processes other than 0, with host_loop_on_process_zero: replay process 0's steps
        until it calls close(); returns the number of steps run."""
        if not self.config.host_loop_on_process_zero or jax.process_index() == 0:
            raise RuntimeError("follow() is for processes 1..N-1 with host_loop_on_process_zero=True")
        from jaxengine.worker.multihost import follow

        return follow(self.runner)

    def close(self) -> None:
        """Abort what is left, collect the step in flight, and (process 0 of several)
        release the followers' loops."""
        self.abort_request(list(self.requests))
        while self._in_flight is not None:
            self.step_core()
        if self._leader is not None:
            self._leader.stop()
            self._leader = None
        if self._structured is not None:
            self._structured.close()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (as vLLM's `reset_prefix_cache`): benchmarks start runs
        cold. Only when no block is in use; returns whether it was reset."""
        return self.scheduler.kv_cache_manager.block_pool.reset_prefix_cache()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, float]:
        s = self.scheduler.make_stats()
        return dataclasses.asdict(s)
