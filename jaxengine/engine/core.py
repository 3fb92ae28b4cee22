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
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.config import EngineConfig
from jaxengine.worker.kv_capacity import (
    claim_device_memory,
    kv_bytes_per_token,
    memory_budget,
    num_blocks_for_budget,
)
from jaxengine.worker.model_runner import ModelRunner
from jaxengine.outputs import Logprob
from jaxengine.core.request import Request, RequestStatus
from jaxengine.sampling_params import SamplingParams
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxengine.engine.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer
from models import PRESETS, CausalLM, ModelConfig, load_model, random_model
from models.sharding import DP, TP, make_mesh

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass(slots=True)
class CoreOutputs:
    """One step's news, by request id (the samples' ids for n > 1: "<id>-<i>"). Plain
    columns and dicts: cheap to build on the step loop and to pickle to a front-end."""

    # Requests that got a token, once per token (several times after a multi-step decode).
    req_ids: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # [len(req_ids)] that token
    # Finished this step (aborts and stop strings included): (RequestStatus, stop_reason).
    finished: dict[str, tuple[int, int | str | None]] = dataclasses.field(default_factory=dict)
    # Only for requests that asked for logprobs: (the token's, top-k ids, top-k logprobs).
    logprobs: dict[str, tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=dict)
    # prompt_logprobs answers: (request id, prompt position, {token id: Logprob}).
    prompt_logprobs: list[tuple[str, int, dict[int, Logprob]]] = dataclasses.field(default_factory=list)
    # First scheduled since the last output: (time.monotonic(), prompt tokens from the prefix cache).
    scheduled: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    # Requests as added (the parent of n > 1 samples) that are now entirely finished.
    done: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.req_ids or self.finished or self.prompt_logprobs or self.scheduled or self.done)

    def extend(self, other: CoreOutputs) -> None:
        self.req_ids += other.req_ids
        self.token_ids += other.token_ids
        self.finished.update(other.finished)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs += other.prompt_logprobs
        self.scheduled.update(other.scheduled)
        self.done += other.done

    def split(self, owner: dict[str, int]) -> dict[int, CoreOutputs]:
        """The outputs per owner (owner[request id], for sample and parent ids); requests
        without an owner are dropped."""
        parts: dict[int, CoreOutputs] = {}

        def part(rid: str) -> CoreOutputs | None:
            i = owner.get(rid)
            if i is None:
                return None
            p = parts.get(i)
            return p if p is not None else parts.setdefault(i, CoreOutputs())

        for rid, tok in zip(self.req_ids, self.token_ids):
            if (p := part(rid)) is not None:
                p.req_ids.append(rid)
                p.token_ids.append(tok)
        for name in ("finished", "logprobs", "scheduled"):
            for rid, value in getattr(self, name).items():
                if (p := part(rid)) is not None:
                    getattr(p, name)[rid] = value
        for entry in self.prompt_logprobs:
            if (p := part(entry[0])) is not None:
                p.prompt_logprobs.append(entry)
        for rid in self.done:
            if (p := part(rid)) is not None:
                p.done.append(rid)
        return parts


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


class EngineCore:
    def __init__(
        self, config: EngineConfig, *, model: CausalLM | None = None, tokenizer: Any = None, progress: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`mesh`: the [dp=1, tp] device mesh this engine runs on (default: built from
        config.tensor_parallel_size; None when it is 1: everything on the first device).
        data_parallel_size > 1 is several engines: see jaxengine.engine.data_parallel."""
        claim_device_memory(config.gpu_memory_utilization)  # before anything starts JAX's backends
        config.resolve_platform_defaults()
        self.config = config
        if mesh is None and config.data_parallel_size > 1:
            raise ValueError(
                f"data_parallel_size={config.data_parallel_size}: one Engine is one replica; use jaxengine.LLM "
                "or jaxengine.engine.data_parallel.DataParallelEngine, which run one Engine per replica"
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
        self.runner = ModelRunner(
            model, num_blocks=None, block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            kv_dtype=self.kv_dtype, attention_fn=_attention_fn(config.use_pallas), mesh=mesh,
            num_scheduler_steps=config.num_scheduler_steps,
            sequence_parallel_min_tokens=config.sequence_parallel_min_tokens,
        )
        self.num_blocks = self._num_kv_blocks()
        if jax.process_count() > 1:  # every process must allocate the same cache
            from jax.experimental import multihost_utils

            self.num_blocks = int(multihost_utils.broadcast_one_to_all(np.int32(self.num_blocks)))
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
        # The model's EOS ids (config.json / generation_config) and the tokenizer's, like vLLM.
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config.eos_token_ids) if self.tokenizer \
            else tuple(self.model_config.eos_token_ids)
        self._rng = random.Random(config.seed)
        self._seeds: dict[str, int] = {}  # sample request id -> sampling seed
        self._requests: dict[str, list[Request]] = {}  # request id as added -> its samples
        self._samples: dict[str, Request] = {}  # sample id -> sample, until its finish is output
        self._finished_outside: list[Request] = []  # aborted / stopped, not yet in an output
        self._scheduled: dict[str, tuple[float, int]] = {}  # first scheduled, for the next output
        self._in_flight = None  # (SchedulerOutput, StepInputs, results) dispatched, not yet collected
        self._num_penalised = 0  # live requests with penalties: they need synchronous steps
        # critical: from collecting a step to dispatching the next (the device surely idles);
        # host_bound_steps: steps whose result was ready before the host came for it.
        self.timing = {"critical_seconds": 0.0, "wait_seconds": 0.0, "loop_seconds": 0.0, "steps": 0, "host_bound_steps": 0,
                       "multi_step_runs": 0}

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

    def add_core_request(
        self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str, priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[str]:
        """Queue a request of token ids; returns its samples' ids (its own when n == 1).
        Raises ValueError for input that can never run (empty, too long, bad token ids,
        bad sampling parameters)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_token_ids
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
        samples = root.fan_out() if params.n > 1 else [root]
        added = []
        try:
            for sample in samples:
                self.scheduler.add_request(sample)
                added.append(sample)
        except ValueError:
            self.scheduler.finish_requests([s.request_id for s in added])
            raise
        if params.has_penalties:
            self._num_penalised += 1  # back when the request is done
        for sample in samples:
            seed = sample.sampling_params.seed
            self._seeds[sample.request_id] = self._rng.getrandbits(32) if seed is None else seed
            self._samples[sample.request_id] = sample
        self._requests[request_id] = samples
        return [s.request_id for s in samples]

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (ids as added) at any time; blocks are freed now, the finish is
        in the next step's outputs."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            live = [s for s in self._requests.get(rid, ()) if not s.is_finished]
            self.scheduler.finish_requests([s.request_id for s in live], RequestStatus.FINISHED_ABORTED)
            self._finished_outside += live

    def stop_requests(self, stops: list[tuple[str, str]]) -> None:
        """Finish samples whose text matched a stop string: (sample id, the stop string)."""
        for sid, stop in stops:
            req = self._samples.get(sid)
            if req is not None and not req.is_finished:
                self.scheduler.finish_requests(sid, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
                self._finished_outside.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self._in_flight is not None

    # ------------------------------------------------------------------ one step

    def step_core(self) -> CoreOutputs:
        """One engine iteration. With async scheduling (the default) the next step is
        scheduled and dispatched before the running one's tokens are collected, so the host's
        work hides behind the device's; steps fall back to `_step_sync` when nothing is in
        flight or a running request uses penalties (they need every token on the host)."""
        t0 = time.perf_counter()
        if self.config.async_scheduling and self._in_flight is not None and not self._num_penalised:
            collected = self._step_async()
        else:
            collected = self._step_sync()
        out = self._outputs(collected)
        self.timing["loop_seconds"] += time.perf_counter() - t0
        return out

    def _step_async(self):
        """Schedule and dispatch step N+1 while N runs (its sampled tokens are fed to N+1
        on the device), then collect N. A request that ends at N (EOS, stop token, length,
        stop string) has already been given one more token (run) in N+1: update() drops it."""
        t0 = time.perf_counter()
        prev_out, prev_inputs, (prev_result, prev_prompt) = self._in_flight
        nxt = self.scheduler.schedule(self._multi_steps())
        new = None
        if nxt.scheduled:
            prev_rows = {s.request.request_id: i for i, s in enumerate(prev_out.scheduled) if s.sample}
            inputs = self.runner.prepare(nxt, self._seeds, prev_rows)
            # N+1 continues from N's (last step's) tokens, one row per request.
            new = (nxt, inputs, self._dispatch(inputs, nxt.num_steps, prev_result.token_ids))
            self._mark_scheduled(nxt)
        t_dispatch = time.perf_counter()
        sampled, before = self._collect(prev_out, prev_result)  # waits for step N
        wait = time.perf_counter() - t_dispatch
        if wait < 1e-4:  # N was done before N+1 was queued: the device may have idled
            self.timing["host_bound_steps"] += 1
            self.timing["critical_seconds"] += t_dispatch - t0
        self.timing["wait_seconds"] += wait
        updated = self.scheduler.update(prev_out, sampled)
        self._in_flight = new
        return prev_out, prev_inputs, prev_result, prev_prompt, updated, before

    def _step_sync(self):
        """One iteration, pipelined so the device never waits for output processing:
        collect the step in flight, schedule and dispatch the next one, and only then hand
        the collected tokens out while the device runs. A stop string therefore ends a
        request one step late: the extra token it got in the step already dispatched is
        dropped by `scheduler.update`."""
        t0 = time.perf_counter()
        done = None
        if self._in_flight is not None:
            out, inputs, (result, prompt_lp) = self._in_flight
            self._in_flight = None
            sampled, before = self._collect(out, result)  # waits for the device
            t_ready = time.perf_counter()
            wait = t_ready - t0
            self.timing["wait_seconds"] += wait
            self.timing["host_bound_steps"] += wait < 1e-4  # the device finished before we looked
            done = (out, inputs, result, prompt_lp, self.scheduler.update(out, sampled), before)
        else:
            t_ready = t0
        nxt = self.scheduler.schedule(self._multi_steps())
        if nxt.scheduled:
            inputs = self.runner.prepare(nxt, self._seeds)
            self._in_flight = (nxt, inputs, self._dispatch(inputs, nxt.num_steps))
            self.timing["critical_seconds"] += time.perf_counter() - t_ready
            self._mark_scheduled(nxt)
        return done

    def _dispatch(self, inputs, num_steps: int, prev_tokens=None):
        """Run a step (or a multi-step decode) on the device: (result, prompt logprobs)."""
        if num_steps > 1:
            self.timing["multi_step_runs"] += 1
            return self.runner.execute_multi(inputs, num_steps, prev_tokens), None
        return self._execute(inputs) if prev_tokens is None else self._execute(inputs, prev_tokens)

    @staticmethod
    def _collect(out: SchedulerOutput, result) -> tuple[dict[str, list[int]], dict[str, int] | None]:
        """A dispatched step's sampled tokens per request (waits for the device), and for a
        multi-step decode each request's output length before them."""
        if out.num_steps == 1:
            token_ids = np.asarray(result.token_ids)
            return {s.request.request_id: [int(token_ids[i])] for i, s in enumerate(out.scheduled) if s.sample}, None
        columns = np.asarray(result.all_token_ids).T.tolist()  # [num_steps, S_max]: a column per request
        sampled = {s.request.request_id: columns[i] for i, s in enumerate(out.scheduled)}
        return sampled, {s.request.request_id: len(s.request.output_token_ids) for s in out.scheduled}

    def _multi_steps(self) -> int:
        """num_scheduler_steps if the next step can run them all in one program: every running
        request decodes (none mid-prefill), has room for that many more tokens and needs no
        per-step sampling work, and no waiting request could be admitted now (none waits, or
        max_num_seqs are running: then a seat that frees inside a run is filled after it);
        else 1."""
        k = self.config.num_scheduler_steps
        sched = self.scheduler
        if k == 1 or self._leader is not None or not sched.running:
            return 1
        if sched.waiting and len(sched.running) < self.config.max_num_seqs:
            return 1
        limit = self.max_model_len - k
        for req in sched.running:
            n = len(req.all_token_ids) + req.num_pending  # with the tokens still on the device
            p = req.sampling_params
            # Any logprobs (even 0: the chosen token's) come from single steps only.
            if (req.num_computed_tokens != n - 1 or n > limit or p.has_per_step_work or p.logprobs is not None
                    or p.prompt_logprobs is not None):
                return 1
        return k

    def _mark_scheduled(self, out) -> None:
        self.timing["steps"] += out.num_steps  # forward passes (a multi-step decode runs several)
        now = time.monotonic()
        for s in out.scheduled:
            req = s.request
            if s.is_new and not req.num_preemptions:  # admitted this step for the first time
                self._scheduled[req.request_id] = (now, max(req.num_cached_tokens, 0))

    def _outputs(self, collected) -> CoreOutputs:
        """A collected step (or None) as CoreOutputs, with what finished outside it."""
        out = CoreOutputs(scheduled=self._scheduled)
        self._scheduled = {}
        finished = self._finished_outside
        self._finished_outside = []
        if collected is not None:
            sched, inputs, result, prompt_lp, updated, before = collected
            if prompt_lp is not None:
                out.prompt_logprobs = self._prompt_logprobs(inputs, jax.tree.map(np.asarray, prompt_lp))
            host = None
            if any(r.sampling_params.logprobs is not None for r in updated):
                host = jax.tree.map(np.asarray, result)
                rows = {s.request.request_id: i for i, s in enumerate(sched.scheduled)}
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
                    out.logprobs[req.request_id] = (float(host.logprobs[row]), host.top_ids[row][:k].tolist(),
                                                    host.top_logprobs[row][:k].tolist())
        for req in finished:
            out.finished[req.request_id] = (int(req.status), req.stop_reason)
            self._seeds.pop(req.request_id, None)
            self._samples.pop(req.request_id, None)
            parent = req.parent_request_id or req.request_id
            samples = self._requests.get(parent)
            if samples is not None and all(s.is_finished for s in samples):
                del self._requests[parent]
                out.done.append(parent)
                if req.sampling_params.has_penalties:
                    self._num_penalised -= 1
        return out

    def _prompt_logprobs(self, inputs, lp) -> list[tuple[str, int, dict[int, Logprob]]]:
        """vLLM's shape: per prompt position, {token: Logprob} for the actual token and the
        top-k; position 0 stays None (nothing predicts the first token)."""
        entries = []
        for r, (sid, pos) in enumerate(inputs.prompt_slots):
            req = self._samples.get(sid)
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
            entries.append((sid, pos, entry))
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
        self.abort_request(list(self._requests))
        while self._in_flight is not None:
            self.step_core()
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
