"""ModelRunner: SchedulerOutput -> padded device arrays -> one jitted forward (KV cache
donated) -> on-device sampling -> sampled tokens back on the host.

The forward is compiled per (T, S) bucket (jaxengine.worker.compilation); the sampler per S
bucket and per variant (top-k/top-p sort, penalties, logprobs, logit-bias width), the common
ones at start-up, the rest when first used.

A step is two jitted calls, each given its host arrays as ONE packed int32 buffer
(jaxengine.worker.packing): the forward (the previous step's sampled tokens merged in, model, KV
write) and the sampler. The sampler stays a call of its own so that its variants do not
multiply the forward's compiled programs.

With `num_scheduler_steps` k > 1, a decode-only step without per-step sampling work can
instead run as ONE program of k forward + sample steps (`execute_multi`): each step's
sampled tokens are the next one's inputs, its positions and KV slots one further on. It
is compiled per decode bucket and per plain sampler variant (greedy, temperature,
top-k/top-p) at start-up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from jaxengine.core.sched.output import SchedulerOutput
from jaxengine.sample.metadata import SamplerVariant, build_sampling_metadata
from jaxengine.sample.sampler import SamplerOutput, compute_logprobs, sample
from jaxengine.sampling_params import MAX_LOGPROBS
from jaxengine.worker import compilation
from jaxengine.worker.compilation import Buckets, FirstRun, Program, ProgramGroup, WarmupPhase
from jaxengine.worker.input_batch import InputBatch
from jaxengine.worker.packing import Layout, pack
from jaxengine.worker.step_inputs import (
    MultiStepOutput,
    PromptLogprobArrays,
    StepInputs,
    placeholder_step_arrays,
    prepare_step,
    sampling_arrays,
    step_arrays,
    unpack_sampling,
    unpack_step,
)
from models import CausalLM
from models.sharding import check_divisible, kv_cache_sharding, replicated, state_shardings

# The plain sampler variants, compiled at start-up for every S bucket (and, with
# num_scheduler_steps > 1, in the multi-step decode): all-greedy, temperature only, top-k/top-p.
PLAIN_VARIANTS = (
    SamplerVariant(num_logprobs=0, use_top_k_top_p=False, use_penalties=False, all_greedy=True),
    SamplerVariant(num_logprobs=0, use_top_k_top_p=False, use_penalties=False, all_greedy=False),
    SamplerVariant(num_logprobs=0, use_top_k_top_p=True, use_penalties=False, all_greedy=False),
)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int | None,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_dtype=jnp.bfloat16,
        attention_fn: Callable | None = None,
        mesh: jax.sharding.Mesh | None = None,
        num_scheduler_steps: int = 1,
        sequence_parallel_min_tokens: int | None = None,
    ):
        """`attention_fn`: the paged attention each layer runs (jaxengine.worker.attention_backend;
        None: the model's default). `mesh`: run tensor parallel over it (models.sharding):
        parameters are placed on their shards (a no-op when loaded that way), the KV cache is
        allocated split by KV head, and attention runs per shard. None: everything on the
        weights' one device. `sequence_parallel_min_tokens` (with a mesh): steps of at least
        this many tokens (the T bucket) keep the residual stream split by token (EngineConfig
        says why)."""
        cfg = model.config
        self.config = cfg
        self.block_size = block_size
        self.max_pages = -(-max_model_len // block_size)
        self.graphdef, state = nnx.split(model)
        # A flat list of leaves: cheap to pass through jit dispatch every step.
        self.state, state_def = jax.tree.flatten(state)
        self.mesh = mesh
        if mesh is not None:
            check_divisible(cfg, mesh)
            shardings, sharding_def = jax.tree.flatten(state_shardings(state, mesh))
            assert sharding_def == state_def, "parameter and sharding trees differ"
            self.state = [jax.device_put(x, s) for x, s in zip(self.state, shardings)]
        self.state_def = state_def
        self.input_batch = InputBatch(max_num_seqs, self.max_pages)
        self.device = self.state[0].sharding if mesh is None else replicated(mesh)
        self.kv_dtype = kv_dtype
        self.kv_caches: list[jax.Array] = []
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)
        self.buckets = Buckets.for_budget(max_num_batched_tokens, max_num_seqs)
        self.num_scheduler_steps = num_scheduler_steps
        self._jit_steps(attention_fn, sequence_parallel_min_tokens if mesh is not None else None)
        # The "previous step's tokens" of a step that has none: placed like the sampler's output.
        self.no_prev_tokens = jax.device_put(np.zeros(self.buckets.seqs[-1], np.int32), self.device)
        # Filled by warmup(): seconds per start-up phase, and each forward's first run.
        self.warmup_breakdown: dict[str, WarmupPhase] = {}
        self.first_run_seconds: list[FirstRun] = []

    # ------------------------------------------------------------------ the jitted steps

    def _jit_steps(self, attention_fn: Callable | None, sp_min: int | None) -> None:
        """Build the step's jitted programs: _forward, _forward_prompt, _sample, _multi_decode."""
        graphdef, state_def, mesh = self.graphdef, self.state_def, self.mesh
        block_size, max_pages = self.block_size, self.max_pages
        s_max = self.buckets.seqs[-1]

        def sequence_parallel(t: int) -> bool:  # for a step of T bucket t (static)
            return sp_min is not None and t >= sp_min

        def merged(state_leaves: list[jax.Array]) -> CausalLM:
            return nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))

        def forward(state_leaves, kv_caches, buf, prev_token_ids, layout):  # -> logits [S, V] f32, caches
            tokens, meta = unpack_step(buf, layout, prev_token_ids)
            model = merged(state_leaves)
            hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn, mesh, sequence_parallel(tokens.shape[0]))
            return model.compute_logits(hidden[meta.logits_indices]), kv_caches

        def forward_prompt(state_leaves, kv_caches, buf, prev_token_ids, rows, targets, layout):
            """forward, plus logprobs of the next prompt token at `rows` [R] (prompt_logprobs)."""
            tokens, meta = unpack_step(buf, layout, prev_token_ids)
            model = merged(state_leaves)
            hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn, mesh, sequence_parallel(tokens.shape[0]))
            logprobs, top_ids, top_logprobs = compute_logprobs(model.compute_logits(hidden[rows]), targets, MAX_LOGPROBS)
            prompt = PromptLogprobArrays(logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
            return model.compute_logits(hidden[meta.logits_indices]), kv_caches, prompt

        def sample_packed(logits, buf, token_bitmask, layout, variant: SamplerVariant) -> SamplerOutput:
            """sample(), its tensors from one packed buffer; token_ids padded to [S_max] so the
            next step's forward takes them in one shape whatever this step's S bucket.
            `token_bitmask` [S, W] int32 or None: None is a program of its own (jit keys on it),
            so batches without a constrained row never see the mask."""
            out = sample(logits, unpack_sampling(buf, layout), token_bitmask=token_bitmask, **variant._asdict())
            return dataclasses.replace(out, token_ids=jnp.pad(out.token_ids, (0, s_max - out.token_ids.shape[0])))

        def multi_decode(state_leaves, kv_caches, buf, sampling_buf, prev_token_ids, layout, sampling_layout,
                         num_steps, variant: SamplerVariant):  # -> MultiStepOutput, caches
            """num_steps decode steps of a decode-only batch (token i is row i): each step's
            sampled tokens are the next one's inputs, one position and KV slot further on."""
            tokens, meta = unpack_step(buf, layout, prev_token_ids)
            tensors = unpack_sampling(sampling_buf, sampling_layout)
            model = merged(state_leaves)
            t, s = tokens.shape[0], meta.kv_lens.shape[0]
            real_tok = jnp.arange(t) < meta.num_seqs[0]  # [T]
            real_row = jnp.arange(s) < meta.num_seqs[0]  # [S]
            row_of_tok = jnp.minimum(jnp.arange(t), s - 1)

            def one_step(i, carry):
                tokens, meta, kv_caches, out = carry
                hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn, mesh, sequence_parallel(t))
                logits = model.compute_logits(hidden[meta.logits_indices])
                sampled = sample(logits, dataclasses.replace(tensors, positions=tensors.positions + i),
                                 use_top_k_top_p=variant.use_top_k_top_p, use_penalties=False,
                                 all_greedy=variant.all_greedy).token_ids  # [S]
                out = out.at[i, :s].set(sampled)
                pos = meta.positions + 1
                page = meta.page_indices[row_of_tok, jnp.minimum(pos // block_size, max_pages - 1)]
                meta = dataclasses.replace(  # padding tokens keep writing into the null page
                    meta,
                    positions=jnp.where(real_tok, pos, meta.positions),
                    slot_mapping=jnp.where(real_tok, page * block_size + pos % block_size, meta.slot_mapping),
                    kv_lens=jnp.where(real_row, meta.kv_lens + 1, meta.kv_lens),
                )
                tokens = jnp.where(real_tok, jnp.pad(sampled, (0, max(t - s, 0)))[:t], tokens)
                return tokens, meta, kv_caches, out

            out = jnp.zeros((num_steps, s_max), jnp.int32)
            _, _, kv_caches, out = jax.lax.fori_loop(0, num_steps, one_step, (tokens, meta, kv_caches, out))
            return MultiStepOutput(token_ids=out[num_steps - 1], all_token_ids=out), kv_caches

        # With a mesh: logits gathered (replicated) for the sampler, caches kept split.
        kv_out = [kv_cache_sharding(mesh)] * self.config.num_layers if mesh is not None else None
        # Sequence parallelism: let XLA overlap each all-gather / reduce-scatter with its
        # matmul (windowed einsum, "collective matmul"); steps below sp_min have neither.
        xla = {} if sp_min is None else {"compiler_options": {
            "xla_gpu_threshold_for_windowed_einsum_mib": 0, "xla_gpu_multi_streamed_windowed_einsum": True}}
        shardings = {} if mesh is None else {"out_shardings": (self.device, kv_out)}
        self._forward = jax.jit(forward, donate_argnums=(1,), static_argnames=("layout",), **shardings, **xla)
        # Compiled on first use (per T, S and row bucket): prompt logprobs are rare.
        shardings = {} if mesh is None else {"out_shardings": (self.device, kv_out, self.device)}
        self._forward_prompt = jax.jit(forward_prompt, donate_argnums=(1,), static_argnames=("layout",),
                                       **shardings, **xla)
        shardings = {} if mesh is None else {"out_shardings": self.device}
        self._sample = jax.jit(sample_packed, static_argnames=("layout", "variant"), **shardings)
        shardings = {} if mesh is None else {"out_shardings": (self.device, kv_out)}
        self._multi_decode = jax.jit(multi_decode, donate_argnums=(1,), static_argnames=(
            "layout", "sampling_layout", "num_steps", "variant"), **shardings)

    # ------------------------------------------------------------------ memory

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One cache per layer, committed to the weights' device(s) like every later (donated)
        cache, so the first call compiles the same program as all the others; with a mesh,
        allocated in place, each device holding its KV heads."""
        cfg, bs = self.config, self.block_size
        self.kv_caches = []  # drop any earlier cache before allocating the new one
        init = functools.partial(pallas_kernels.init_kv_cache, num_blocks, bs, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
        if self.mesh is None:
            self.kv_caches = [jax.device_put(init(), self.device) for _ in range(cfg.num_layers)]
        else:
            self.kv_caches = [jax.jit(init, out_shardings=kv_cache_sharding(self.mesh))() for _ in range(cfg.num_layers)]

    def profile_peak_bytes(self) -> int:
        """Device memory a step needs beyond weights and KV cache, from XLA's own accounting of
        the compiled programs: the larger of the biggest forward and the sampler over a full
        batch (its sort over [S, V] can be the larger: 3.5 GB at S = 1024 and the 8B's 128k
        vocabulary). 0 on a backend without the accounting."""
        return max(self._forward_peak_bytes(), self._sampler_peak_bytes())

    def _forward_peak_bytes(self) -> int:
        """The largest forward's temporaries and the logits it returns, lowered over a 2-page
        cache (the kernel never materialises the context, so the pool size does not change
        the activations)."""
        t = self.buckets.tokens[-1]
        buf, layout = self._forward_args(t, min(self.buckets.seqs[-1], t))
        analysis = self._forward.lower(self.state, self._abstract_kv_cache(2), buf, self.no_prev_tokens,
                                       layout=layout).compile().memory_analysis()
        return 0 if analysis is None else int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)

    def _sampler_peak_bytes(self) -> int:
        """The top-k/top-p sampler over the largest S bucket: its temporaries and the logits it reads."""
        s = self.buckets.seqs[-1]
        buf, layout = self._sampling_buf(s)
        logits = jax.ShapeDtypeStruct((s, self.config.vocab_size), jnp.float32, sharding=self.device)
        analysis = self._sample.lower(logits, buf, None, layout=layout, variant=PLAIN_VARIANTS[2]).compile().memory_analysis()
        return 0 if analysis is None else int(
            analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)

    def _sampling_buf(self, s: int) -> tuple[np.ndarray, Layout]:
        """Neutral sampling tensors of an S bucket, packed as `execute` packs them."""
        static = self.input_batch.static.take(np.zeros(s, np.intp))  # the padding row's
        return pack(sampling_arrays(build_sampling_metadata(static, np.zeros(s, np.int32), [], []).tensors))

    def _abstract_kv_cache(self, num_blocks: int) -> list[jax.ShapeDtypeStruct]:
        """The KV cache's shapes and shardings, to compile against before (or without) it."""
        cfg = self.config
        sharding = self.device if self.mesh is None else kv_cache_sharding(self.mesh)
        return [jax.ShapeDtypeStruct((2, cfg.num_kv_heads, num_blocks, self.block_size, cfg.head_dim), self.kv_dtype,
                                     sharding=sharding)] * cfg.num_layers

    def _forward_args(self, t: int, s: int) -> tuple[np.ndarray, Layout]:
        """A placeholder step of a (T, S) bucket, packed as `execute` packs it."""
        return pack(placeholder_step_arrays(t, s, self.max_pages))

    # ------------------------------------------------------------------ host side

    def prepare(self, out: SchedulerOutput, seeds: dict[str, int], prev_rows: dict[str, int] | None = None) -> StepInputs:
        """The step's inputs (jaxengine.worker.step_inputs.prepare_step): `seeds` per request
        id; `prev_rows` (async scheduling) each request's row in the step still running."""
        return prepare_step(out, self.input_batch, self.buckets, self.block_size, seeds, prev_rows)

    # ------------------------------------------------------------------ device side

    def execute(
        self, inputs: StepInputs, prev_token_ids: jax.Array | None = None, token_bitmask: np.ndarray | None = None,
    ) -> tuple[SamplerOutput, PromptLogprobArrays | None]:
        """Dispatch the step; returns device arrays (asynchronous until read).
        `prev_token_ids`: the running step's sampled tokens ([S_max], on the device), for
        inputs.token_src. `token_bitmask`: as for `run_sampler`."""
        logits, prompt = self.run_forward(inputs, prev_token_ids)
        return self.run_sampler(logits, inputs, token_bitmask), prompt

    def run_forward(
        self, inputs: StepInputs, prev_token_ids: jax.Array | None = None
    ) -> tuple[jax.Array, PromptLogprobArrays | None]:
        """The step's forward alone: logits [S, V] (and prompt logprobs) on the device. A step
        with constrained rows dispatches it before the previous step's tokens are on the host,
        and its sampler (`run_sampler`) once they are and its grammar masks are filled."""
        prompt = None
        buf, layout = pack(step_arrays(inputs))
        prev = self.no_prev_tokens if prev_token_ids is None else prev_token_ids
        if inputs.prompt_rows is None:
            logits, self.kv_caches = self._forward(self.state, self.kv_caches, buf, prev, layout=layout)
        else:
            logits, self.kv_caches, prompt = self._forward_prompt(
                self.state, self.kv_caches, buf, prev, inputs.prompt_rows, inputs.prompt_targets, layout=layout)
        return logits, prompt

    def run_sampler(self, logits: jax.Array, inputs: StepInputs, token_bitmask: np.ndarray | None = None) -> SamplerOutput:
        """The step's sampler over `run_forward`'s logits [S, V]; `token_bitmask` [S, ceil(V/32)]
        int32: the allowed tokens of each row (structured outputs), None when no row is constrained."""
        sampling, sampling_layout = pack(sampling_arrays(inputs.sampling))
        return self._sample(logits, sampling, token_bitmask, layout=sampling_layout, variant=inputs.variant)

    def execute_multi(
        self, inputs: StepInputs, num_steps: int, prev_token_ids: jax.Array | None = None
    ) -> MultiStepOutput:
        """Dispatch `num_steps` decode steps of a decode-only batch whose rows need no per-step
        sampling work (no penalties, logit bias, min_tokens or logprobs) as one program.
        `prev_token_ids`: as for `execute`."""
        assert inputs.prompt_rows is None and not inputs.variant.use_penalties and not inputs.variant.num_logprobs
        buf, layout = pack(step_arrays(inputs))
        sampling, sampling_layout = pack(sampling_arrays(inputs.sampling))
        prev = self.no_prev_tokens if prev_token_ids is None else prev_token_ids
        out, self.kv_caches = self._multi_decode(
            self.state, self.kv_caches, buf, sampling, prev, layout=layout,
            sampling_layout=sampling_layout, num_steps=num_steps, variant=inputs.variant)
        return out

    # ------------------------------------------------------------------ start-up

    def warmup(self, num_blocks: int, progress: bool = True, compile_threads: int = 1) -> float:
        """Compile every (T, S) forward bucket and the plain sampler variants (and the
        multi-step decodes), allocate the KV cache of `num_blocks`, and run each program once
        (jaxengine.worker.compilation.warm_up says in which order, and why); returns seconds."""
        abstract_kv = self._abstract_kv_cache(num_blocks)
        no_prev = self.no_prev_tokens

        def forward(t: int, s: int) -> Program:
            buf, layout = self._forward_args(t, s)

            def run() -> jax.Array:
                logits, self.kv_caches = self._forward(self.state, self.kv_caches, buf, no_prev, layout=layout)
                return logits

            return Program(f"forward T={t} S={s}",
                           lambda: self._forward.lower(self.state, abstract_kv, buf, no_prev, layout=layout), run)

        def sampler(s: int, variant: SamplerVariant) -> Program:
            buf, layout = self._sampling_buf(s)
            logits = jax.device_put(jnp.zeros((s, self.config.vocab_size), jnp.float32), self.device)
            return Program(f"sampler S={s} {variant}",
                           lambda: self._sample.lower(logits, buf, None, layout=layout, variant=variant),
                           lambda: self._sample(logits, buf, None, layout=layout, variant=variant))

        def multi_step(t: int, s: int, variant: SamplerVariant) -> Program:
            (buf, layout), (sbuf, slayout) = self._forward_args(t, s), self._sampling_buf(s)
            static = dict(layout=layout, sampling_layout=slayout, num_steps=self.num_scheduler_steps, variant=variant)

            def run() -> MultiStepOutput:
                out, self.kv_caches = self._multi_decode(self.state, self.kv_caches, buf, sbuf, no_prev, **static)
                return out

            return Program(f"multi_step T={t} S={s} {variant}",
                           lambda: self._multi_decode.lower(self.state, abstract_kv, buf, sbuf, no_prev, **static), run)

        steps = self.buckets.steps()
        decodes = self.buckets.decodes() if self.num_scheduler_steps > 1 else []
        groups = [
            ProgramGroup("forward", [forward(t, s) for t, s in steps], time_first_runs=True),
            ProgramGroup("sampler", [sampler(s, v) for s in sorted({s for _, s in steps}) for v in PLAIN_VARIANTS]),
            ProgramGroup("multi_step", [multi_step(t, s, v) for t, s in decodes for v in PLAIN_VARIANTS]),
        ]

        def allocate() -> None:
            self.allocate_kv_cache(num_blocks)
            jax.block_until_ready(self.kv_caches)

        self.kv_caches = []  # no cache while compiling (a runner may be warmed up again)
        report = compilation.warm_up(groups, allocate, progress=progress, compile_threads=compile_threads)
        self.warmup_breakdown, self.first_run_seconds = report.phases, report.first_runs
        return report.seconds

    def model(self) -> CausalLM:
        """The module over the runner's parameters (for references and checks)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, self.state))

    def num_compiled_programs(self) -> int:
        return (self._forward._cache_size() + self._forward_prompt._cache_size() + self._sample._cache_size()
                + self._multi_decode._cache_size())
