"""ModelRunner: SchedulerOutput -> padded device arrays -> one jitted forward (KV cache
donated) -> on-device sampling -> sampled tokens back on the host.

Shapes are bucketed so XLA compiles a handful of programs at start-up and none in steady
state: the flat token count T is padded up to a power of two (>= 16) and the sequence count
S to one of a few sizes. The forward is compiled per (T, S) bucket; the sampler per S bucket
and per variant (top-k/top-p sort, penalties, logprobs, logit-bias width), the common ones at
start-up, the rest when first used.

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
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import pallas_kernels
from jaxengine.worker.packing import Layout, pack, unpack
from jaxengine.sample.sampler import SamplerOutput, SamplingTensors, compute_logprobs, sample, seed_to_words
from jaxengine.sampling_params import MAX_LOGPROBS
from jaxengine.core.sched.scheduler import ScheduledRequest, SchedulerOutput
from models import AttentionMetadata, CausalLM
from models.sharding import check_divisible, kv_cache_sharding, replicated, state_shardings


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiStepOutput:
    """A multi-step decode's sampled tokens; `token_ids` is the last step's row on its own,
    so the next step can start from it without another (eager) device op on the host path."""
    token_ids: jax.Array  # [S_max] i32, the last step's tokens
    all_token_ids: jax.Array  # [num_steps, S_max] i32


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's host arrays, padded to its bucket, plus the sampler variant."""

    tokens: np.ndarray  # [T] int32
    meta: AttentionMetadata  # numpy leaves
    sampling: SamplingTensors  # numpy leaves, [S] rows
    num_logprobs: int
    use_top_k_top_p: bool
    use_penalties: bool
    all_greedy: bool
    num_seqs: int  # real rows
    # Prompt logprobs (None when no scheduled request asks): flat rows whose next token is a
    # prompt token, that token, and where the answer goes: (request id, prompt position).
    prompt_rows: np.ndarray | None = None  # [R] int32
    prompt_targets: np.ndarray | None = None  # [R] int32
    prompt_slots: list[tuple[str, int]] | None = None
    # Async scheduling: per token, the row of the previous step's sampled tokens that holds
    # it (-1: known on the host, in `tokens`). None when every token is known.
    token_src: np.ndarray | None = None  # [T] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Device arrays for StepInputs.prompt_rows: log_softmax of the raw logits."""

    logprobs: jax.Array  # [R] f32, of the actual next prompt token
    top_ids: jax.Array  # [R, MAX_LOGPROBS] i32
    top_logprobs: jax.Array  # [R, MAX_LOGPROBS] f32


@dataclasses.dataclass
class _RequestRow:
    """What the runner keeps per running request between steps."""

    slot: int  # its row of ModelRunner._tables and ._static (0 is the padding row)
    num_blocks: int  # how much of its block table is written there
    special: bool  # SamplingParams.has_per_step_work
    prompt_logprobs: bool  # it answers prompt_logprobs (the first sample of its request)


# _static_sampling of a padding row: greedy, every filter and penalty off.
_NEUTRAL_SAMPLING = (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0, 0)


def _static_sampling(req, seed: int) -> tuple[float, ...]:
    """The per-request sampling parameters that never change, in SamplingTensors' order."""
    p = req.sampling_params
    hi, lo = seed_to_words(seed)
    return (p.temperature, max(p.top_k, 0), p.top_p, p.min_p, p.repetition_penalty,
            p.presence_penalty, p.frequency_penalty, hi, lo)


_META_FIELDS = [f.name for f in dataclasses.fields(AttentionMetadata)]
_SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingTensors)]


def _step_arrays(inputs: StepInputs) -> list[np.ndarray]:
    """The forward's host arrays, in `_unpack_step`'s order."""
    src = inputs.token_src if inputs.token_src is not None else np.full(inputs.tokens.shape, -1, np.int32)
    return [inputs.tokens, src, *(getattr(inputs.meta, f) for f in _META_FIELDS)]


def _unpack_step(
    buf: jax.Array,  # [N] int32, pack(_step_arrays(inputs))
    layout: Layout,
    prev_token_ids: jax.Array,  # [S_max] int32, the previous step's sampled tokens
) -> tuple[jax.Array, AttentionMetadata]:  # tokens [T], metadata
    tokens, src, *meta = unpack(buf, layout)
    # Async scheduling: tokens sampled by the step still running are taken from its output.
    tokens = jnp.where(src >= 0, prev_token_ids[jnp.maximum(src, 0)], tokens)
    return tokens, AttentionMetadata(**dict(zip(_META_FIELDS, meta)))


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
        """`mesh`: run tensor parallel over it (models.sharding): parameters are placed on their
        shards (a no-op when loaded that way), the KV cache is allocated split by KV head, and
        attention runs per shard. None: everything on the weights' one device.
        `sequence_parallel_min_tokens` (with a mesh): steps of at least this many tokens (the
        T bucket) keep the residual stream split by token (EngineConfig says why)."""
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
        # Per running request, its block table and static sampling parameters live in a row
        # of these (its slot), so a step gathers all of them with one indexing call each.
        self._rows: dict[str, _RequestRow] = {}
        self._tables = np.zeros((max_num_seqs + 1, self.max_pages), np.int32)  # [slots, max_pages]
        self._static = np.tile(np.array(_NEUTRAL_SAMPLING, np.float64), (max_num_seqs + 1, 1))  # [slots, 9]
        self._free_slots = list(range(max_num_seqs, 0, -1))
        self.device = self.state[0].sharding if mesh is None else replicated(mesh)
        self.kv_dtype = kv_dtype
        self.kv_caches: list[jax.Array] = []
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)
        # T: powers of two up to the token budget; S: a few sizes, never more than T.
        top = _pow2(max_num_batched_tokens, 1)
        self.token_buckets = [b for b in (2**i for i in range(31)) if min(16, top) <= b <= top]
        self.seq_buckets = sorted({min(s, max_num_seqs) for s in (16, 64)} | {max_num_seqs})
        graphdef = self.graphdef
        s_max = self.seq_buckets[-1]
        self.num_scheduler_steps = num_scheduler_steps
        block_size, max_pages = self.block_size, self.max_pages
        sp_min = sequence_parallel_min_tokens if mesh is not None else None

        def sequence_parallel(t: int) -> bool:  # for a step of T bucket t (static)
            return sp_min is not None and t >= sp_min

        def merged(state_leaves) -> CausalLM:
            return nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))

        def sampling_tensors(buf, layout) -> SamplingTensors:
            return SamplingTensors(**dict(zip(_SAMPLING_FIELDS, unpack(buf, layout))))

        def forward(state_leaves, kv_caches, buf, prev_token_ids, layout):  # -> logits [S, V] f32, caches
            tokens, meta = _unpack_step(buf, layout, prev_token_ids)
            model = merged(state_leaves)
            hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn, mesh, sequence_parallel(tokens.shape[0]))
            return model.compute_logits(hidden[meta.logits_indices]), kv_caches

        def forward_prompt(state_leaves, kv_caches, buf, prev_token_ids, rows, targets, layout):
            """forward, plus logprobs of the next prompt token at `rows` (prompt_logprobs)."""
            tokens, meta = _unpack_step(buf, layout, prev_token_ids)
            model = merged(state_leaves)
            hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn, mesh, sequence_parallel(tokens.shape[0]))
            lp = compute_logprobs(model.compute_logits(hidden[rows]), targets, MAX_LOGPROBS)
            return model.compute_logits(hidden[meta.logits_indices]), kv_caches, lp

        def sample_packed(logits, buf, layout, **variant) -> SamplerOutput:
            """sample(), its tensors from one packed buffer; token_ids padded to [S_max] so the
            next step's forward takes them in one shape whatever this step's S bucket."""
            out = sample(logits, sampling_tensors(buf, layout), **variant)
            return dataclasses.replace(out, token_ids=jnp.pad(out.token_ids, (0, s_max - out.token_ids.shape[0])))

        def multi_decode(state_leaves, kv_caches, buf, sampling_buf, prev_token_ids, layout, sampling_layout,
                         num_steps, use_top_k_top_p, all_greedy):  # -> MultiStepOutput, caches
            """num_steps decode steps of a decode-only batch (token i is row i): each step's
            sampled tokens are the next one's inputs, one position and KV slot further on."""
            tokens, meta = _unpack_step(buf, layout, prev_token_ids)
            tensors = sampling_tensors(sampling_buf, sampling_layout)
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
                                 use_top_k_top_p=use_top_k_top_p, use_penalties=False,
                                 all_greedy=all_greedy).token_ids  # [S]
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
        kv_out = [kv_cache_sharding(mesh)] * cfg.num_layers if mesh is not None else None
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
        self._sample = jax.jit(sample_packed, static_argnames=(
            "layout", "num_logprobs", "use_top_k_top_p", "use_penalties", "all_greedy"), **shardings)
        shardings = {} if mesh is None else {"out_shardings": (self.device, kv_out)}
        self._multi_decode = jax.jit(multi_decode, donate_argnums=(1,), static_argnames=(
            "layout", "sampling_layout", "num_steps", "use_top_k_top_p", "all_greedy"), **shardings)
        # The "previous step's tokens" of a step that has none: placed like the sampler's output.
        self.no_prev_tokens = jax.device_put(np.zeros(s_max, np.int32), self.device)

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
        t = self.token_buckets[-1]
        buf, layout = self._forward_args(t, min(self.seq_buckets[-1], t))
        analysis = self._forward.lower(self.state, self._abstract_kv_cache(2), buf, self.no_prev_tokens,
                                       layout=layout).compile().memory_analysis()
        return 0 if analysis is None else int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)

    def _sampler_peak_bytes(self) -> int:
        """The top-k/top-p sampler over the largest S bucket: its temporaries and the logits it reads."""
        s = self.seq_buckets[-1]
        buf, layout = self._sampling_buf(s)
        logits = jax.ShapeDtypeStruct((s, self.config.vocab_size), jnp.float32, sharding=self.device)
        analysis = self._sample.lower(logits, buf, layout=layout, num_logprobs=0, use_top_k_top_p=True,
                                      use_penalties=False, all_greedy=False).compile().memory_analysis()
        return 0 if analysis is None else int(
            analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)

    def _sampling_buf(self, s: int) -> tuple[np.ndarray, Layout]:
        """Neutral sampling tensors of an S bucket, packed as `execute` packs them."""
        tensors, _ = self._sampling_tensors([], self._static[np.zeros(s, np.intp)], np.zeros(s, np.int32), [])
        return pack([getattr(tensors, f) for f in _SAMPLING_FIELDS])

    def _abstract_kv_cache(self, num_blocks: int) -> list[jax.ShapeDtypeStruct]:
        """The KV cache's shapes and shardings, to compile against before (or without) it."""
        cfg = self.config
        sharding = self.device if self.mesh is None else kv_cache_sharding(self.mesh)
        return [jax.ShapeDtypeStruct((2, cfg.num_kv_heads, num_blocks, self.block_size, cfg.head_dim), self.kv_dtype,
                                     sharding=sharding)] * cfg.num_layers

    def _forward_args(self, t: int, s: int) -> tuple[np.ndarray, Layout]:
        """A placeholder step of a (T, S) bucket, packed as `execute` packs it."""
        meta = AttentionMetadata(
            positions=np.zeros(t, np.int32), slot_mapping=np.zeros(t, np.int32),
            kv_lens=np.zeros(s, np.int32), page_indices=np.zeros((s, self.max_pages), np.int32),
            cu_q_lens=np.zeros(s + 1, np.int32), num_seqs=np.zeros(1, np.int32),
            logits_indices=np.zeros(s, np.int32),
        )
        return pack([np.zeros(t, np.int32), np.full(t, -1, np.int32), *(getattr(meta, f) for f in _META_FIELDS)])

    # ------------------------------------------------------------------ buckets

    def _bucket(self, buckets: list[int], n: int, what: str) -> int:
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"{what} {n} is larger than the largest bucket {buckets[-1]}")

    # ------------------------------------------------------------------ host side

    def prepare(self, out: SchedulerOutput, seeds: dict[str, int], prev_rows: dict[str, int] | None = None) -> StepInputs:
        """Flatten the scheduled requests into the ragged batch (numpy, padded).

        This is on the host's critical path every step, so per-request work is plain Python
        on cached rows: a request's block-table row and its sampling parameters are built once
        and touched again only when it gets new blocks. `prev_rows`: with async scheduling,
        the row of each request in the step still running, whose sampled token (not yet on
        the host) is this step's input: the device takes it from there."""
        for rid in (*out.finished_req_ids, *out.preempted_req_ids):
            if (row := self._rows.pop(rid, None)) is not None:
                self._free_slots.append(row.slot)
        sched = out.scheduled
        num_seqs = len(sched)
        t_real = out.total_num_scheduled_tokens
        t_pad = self._bucket(self.token_buckets, t_real, "scheduled token count")
        s_pad = min(self._bucket(self.seq_buckets, num_seqs, "sequence count"), t_pad)
        bs = self.block_size

        tokens: list[int] = []
        starts: list[int] = []  # per request: its first position this step
        cu = [0]
        slots: list[int] = []  # per request: its row of _tables / _static
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_slots: list[tuple[str, int]] = []
        pending: list[tuple[int, int]] = []  # (flat row, row in the previous step's output)
        special: list[int] = []  # rows with per-step sampling work
        rows = self._rows
        for r, s in enumerate(sched):  # ~256 times a step: kept lean (no call on the common path)
            n, start, req = s.num_tokens, s.start_position, s.request
            row = rows.get(req.request_id)
            if row is None or s.is_new or len(s.block_ids) != row.num_blocks:
                row = self._table_row(s, seeds)
            slots.append(row.slot)
            if row.special:
                special.append(r)
            all_ids = req.all_token_ids
            if n == 1:  # a decode: the common case
                if start < len(all_ids):
                    tokens.append(all_ids[start])
                else:  # sampled by the step still running: filled in on the device
                    pending.append((len(tokens), prev_rows[req.request_id]))
                    tokens.append(0)
            else:
                tokens += all_ids[start : start + n]
            if row.prompt_logprobs and start < req.num_prompt_tokens - 1:
                # Row start+i predicts the prompt token at start+i+1 (n > 1 children share one answer).
                for i in range(min(n, req.num_prompt_tokens - 1 - start)):
                    prompt_rows.append(cu[-1] + i)
                    prompt_targets.append(all_ids[start + i + 1])
                    prompt_slots.append((req.request_id, start + i + 1))
            starts.append(start)
            cu.append(cu[-1] + n)
        row_slots = np.zeros(s_pad, np.intp)  # padding rows read slot 0
        row_slots[:num_seqs] = slots

        def padded(values, size: int, fill: int) -> np.ndarray:
            arr = np.full(size, fill, np.int32)
            arr[: len(values)] = values
            return arr

        # Positions and KV slots of every token at once, from each request's start and its
        # block-table row (no per-token Python: a 4096-token prefill chunk is one numpy op).
        tables = self._tables[row_slots]  # [s_pad, max_pages]
        cu_arr = padded(cu, s_pad + 1, t_real)
        starts_arr = np.asarray(starts, np.int32)
        counts = np.diff(cu_arr[: num_seqs + 1])
        seq_of = np.repeat(np.arange(num_seqs), counts)  # [t_real] the request of each token
        positions = np.arange(t_real, dtype=np.int32) + (starts_arr - cu_arr[:num_seqs])[seq_of]
        slot_arr = np.arange(t_pad, dtype=np.int32) % bs  # padding writes into the null page
        slot_arr[:t_real] = tables[seq_of, positions // bs] * bs + positions % bs
        kv_lens = padded(starts_arr + counts, s_pad, 0)  # also the position each row samples at
        meta = AttentionMetadata(
            positions=padded(positions, t_pad, 0), slot_mapping=slot_arr, kv_lens=kv_lens,
            page_indices=tables, cu_q_lens=cu_arr, num_seqs=np.array([num_seqs], np.int32),
            logits_indices=np.maximum(cu_arr[1:] - 1, 0),
        )
        sampling, flags = self._sampling_tensors(sched, self._static[row_slots], kv_lens, special)
        inputs = StepInputs(padded(tokens, t_pad, 0), meta, sampling, *flags, num_seqs)
        if pending:
            src = np.full(t_pad, -1, np.int32)
            for flat, prev in pending:
                src[flat] = prev
            inputs = dataclasses.replace(inputs, token_src=src)
        if prompt_rows:
            r_pad = _pow2(len(prompt_rows), 16)
            inputs = dataclasses.replace(
                inputs, prompt_rows=padded(prompt_rows, r_pad, 0), prompt_targets=padded(prompt_targets, r_pad, 0),
                prompt_slots=prompt_slots,
            )
        return inputs

    def _table_row(self, s: ScheduledRequest, seeds: dict[str, int]) -> _RequestRow:
        rid = s.request.request_id
        row = self._rows.get(rid)
        if row is None or s.is_new:
            if row is not None:
                self._free_slots.append(row.slot)
            p = s.request.sampling_params
            prompt_lp = p.prompt_logprobs is not None and s.request.sample_index == 0
            row = self._rows[rid] = _RequestRow(self._take_slot(), 0, p.has_per_step_work, prompt_lp)
            self._tables[row.slot] = 0
            self._static[row.slot] = _static_sampling(s.request, seeds[rid])
        if len(s.block_ids) != row.num_blocks:
            self._tables[row.slot, row.num_blocks : len(s.block_ids)] = s.block_ids[row.num_blocks :]
            row.num_blocks = len(s.block_ids)
        return row

    def _take_slot(self) -> int:
        if not self._free_slots:  # more live rows than max_num_seqs (not expected): grow
            n = len(self._tables)
            self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)])
            self._static = np.concatenate([self._static, np.tile(self._static[:1], (n, 1))])
            self._free_slots = list(range(2 * n - 1, n - 1, -1))
        return self._free_slots.pop()

    def _sampling_tensors(self, sched: list[ScheduledRequest], static: np.ndarray, positions: np.ndarray,
                          special: list[int]):
        """static: [S, 9] the rows' _static_sampling (padding rows neutral); positions: [S]
        the position each row samples at; special: the rows with logit bias, min_tokens,
        penalties or logprobs (the others need no per-step work here)."""
        s_pad = len(static)
        temperature, top_p, min_p = (static[:, j].astype(np.float32) for j in (0, 2, 3))
        top_k = static[:, 1].astype(np.int32)
        rep, presence, frequency = (static[:, j].astype(np.float32) for j in (4, 5, 6))
        seed_arr = static[:, 7:9].astype(np.uint32)  # (hi, lo) words of a 64-bit seed

        biases: dict[int, dict[int, float]] = {}
        penalised: list[int] = []
        num_logprobs = 0
        for i in special:
            s = sched[i]
            req = s.request
            p = req.sampling_params
            if p.logit_bias or p.min_tokens:
                bias = dict(p.logit_bias) if p.logit_bias else {}
                # Outputs before the token being sampled (pending ones included): EOS and
                # stop tokens may not end the request before min_tokens.
                if s.start_position + s.num_tokens - req.num_prompt_tokens < p.min_tokens:
                    for tok in (*p.stop_token_ids, *req.eos_token_ids):
                        bias[tok] = -math.inf
                if bias:
                    biases[i] = bias
            if p.has_penalties:
                penalised.append(i)
            if p.logprobs:
                num_logprobs = MAX_LOGPROBS
        b = _pow2(max(map(len, biases.values()), default=0), 1)
        bias_ids = np.full((s_pad, b), -1, np.int32)
        bias_vals = np.zeros((s_pad, b), np.float32)
        for i, bias in biases.items():
            bias_ids[i, : len(bias)] = list(bias)
            bias_vals[i, : len(bias)] = list(bias.values())
        length = _pow2(max((sched[i].request.num_tokens for i in penalised), default=1), 1)
        pen_ids = np.full((s_pad, length), -1, np.int32)
        pen_out = np.zeros((s_pad, length), bool)
        for i in penalised:
            req = sched[i].request
            pen_ids[i, : req.num_tokens] = req.all_token_ids
            pen_out[i, req.num_prompt_tokens : req.num_tokens] = True
        all_greedy = bool((temperature < 1e-5).all())
        # Greedy rows take the argmax, which top-k/top-p never remove: no variant for it.
        use_top_k_top_p = not all_greedy and bool((top_k > 0).any() or (top_p < 1).any())
        tensors = SamplingTensors(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
            presence_penalty=presence, frequency_penalty=frequency, seeds=seed_arr, positions=positions,
            logit_bias_ids=bias_ids, logit_bias_values=bias_vals, penalty_token_ids=pen_ids, penalty_is_output=pen_out,
        )
        return tensors, (num_logprobs, use_top_k_top_p, bool(penalised), all_greedy)

    # ------------------------------------------------------------------ device side

    def execute(
        self, inputs: StepInputs, prev_token_ids: jax.Array | None = None
    ) -> tuple[SamplerOutput, PromptLogprobs | None]:
        """Dispatch the step; returns device arrays (asynchronous until read).
        `prev_token_ids`: the running step's sampled tokens ([S_max], on the device), for
        inputs.token_src."""
        prompt = None
        buf, layout = pack(_step_arrays(inputs))
        prev = self.no_prev_tokens if prev_token_ids is None else prev_token_ids
        if inputs.prompt_rows is None:
            logits, self.kv_caches = self._forward(self.state, self.kv_caches, buf, prev, layout=layout)
        else:
            logits, self.kv_caches, lp = self._forward_prompt(
                self.state, self.kv_caches, buf, prev, inputs.prompt_rows, inputs.prompt_targets, layout=layout)
            prompt = PromptLogprobs(*lp)
        sampling, sampling_layout = pack([getattr(inputs.sampling, f) for f in _SAMPLING_FIELDS])
        return self._sample(
            logits, sampling, layout=sampling_layout, num_logprobs=inputs.num_logprobs,
            use_top_k_top_p=inputs.use_top_k_top_p, use_penalties=inputs.use_penalties,
            all_greedy=inputs.all_greedy,
        ), prompt

    def execute_multi(
        self, inputs: StepInputs, num_steps: int, prev_token_ids: jax.Array | None = None
    ) -> MultiStepOutput:
        """Dispatch `num_steps` decode steps of a decode-only batch whose rows need no per-step
        sampling work (no penalties, logit bias, min_tokens or logprobs) as one program.
        `prev_token_ids`: as for `execute`."""
        assert inputs.prompt_rows is None and not inputs.use_penalties and not inputs.num_logprobs
        buf, layout = pack(_step_arrays(inputs))
        sampling, sampling_layout = pack([getattr(inputs.sampling, f) for f in _SAMPLING_FIELDS])
        prev = self.no_prev_tokens if prev_token_ids is None else prev_token_ids
        out, self.kv_caches = self._multi_decode(
            self.state, self.kv_caches, buf, sampling, prev, layout=layout,
            sampling_layout=sampling_layout, num_steps=num_steps, use_top_k_top_p=inputs.use_top_k_top_p,
            all_greedy=inputs.all_greedy)
        return out

    def _decode_buckets(self) -> list[tuple[int, int]]:
        """The (T, S) buckets `prepare` gives a decode-only step of 1..max_num_seqs requests."""
        top = self.seq_buckets[-1]
        return sorted({(t, min(self._bucket(self.seq_buckets, n, ""), t))
                       for n in range(1, top + 1) for t in [self._bucket(self.token_buckets, n, "")]})

    def warmup(self, num_blocks: int, progress: bool = True, compile_threads: int = 1) -> float:
        """Compile every (T, S) forward bucket and the common sampler variants, allocate the
        KV cache of `num_blocks`, and run each program once; returns seconds.

        The programs are compiled ahead of the allocation, against an abstract cache of the
        real shape: on a GPU, XLA autotunes each matmul by running candidates in free device
        memory, and a cache sized to the memory budget leaves none. The runs that follow hit
        the same executables (same shapes and shardings) and fill jit's dispatch cache.

        Lowering (tracing, Python) runs one program at a time; XLA's compile releases the GIL,
        so up to `compile_threads` programs compile at once while the next ones are lowered.
        A model's layers are unrolled, so each program's compile time grows with its depth."""
        t0 = time.perf_counter()
        pairs = sorted({(t, min(s, t)) for t in self.token_buckets for s in self.seq_buckets})
        # The plain sampler variants (use_top_k_top_p, all_greedy): all-greedy, temperature
        # only, and top-k/top-p; per S bucket, and (num_scheduler_steps > 1) per decode bucket
        # of the multi-step decode.
        plain = ((False, True), (False, False), (True, False))
        samplers = [(s, k, g) for s in sorted({s for _, s in pairs}) for k, g in plain]
        multis = [(t, s, k, g) for t, s in self._decode_buckets() for k, g in plain] if self.num_scheduler_steps > 1 else []
        abstract_kv = self._abstract_kv_cache(num_blocks)

        def sampler_args(s: int, use_top_k_top_p: bool, all_greedy: bool) -> tuple[tuple, dict]:
            buf, layout = self._sampling_buf(s)
            logits = jax.device_put(jnp.zeros((s, self.config.vocab_size), jnp.float32), self.device)
            return (logits, buf), dict(layout=layout, num_logprobs=0, use_top_k_top_p=use_top_k_top_p,
                                       use_penalties=False, all_greedy=all_greedy)

        def multi_args(t: int, s: int, use_top_k_top_p: bool, all_greedy: bool) -> tuple[tuple, dict]:
            (buf, layout), (sbuf, slayout) = self._forward_args(t, s), self._sampling_buf(s)
            return (buf, sbuf, self.no_prev_tokens), dict(
                layout=layout, sampling_layout=slayout, num_steps=self.num_scheduler_steps,
                use_top_k_top_p=use_top_k_top_p, all_greedy=all_greedy)

        def lower_forward(t: int, s: int) -> jax.stages.Lowered:
            buf, layout = self._forward_args(t, s)
            return self._forward.lower(self.state, abstract_kv, buf, self.no_prev_tokens, layout=layout)

        def lower_sampler(variant: tuple) -> jax.stages.Lowered:
            args, kwargs = sampler_args(*variant)
            return self._sample.lower(*args, **kwargs)

        def lower_multi(variant: tuple) -> jax.stages.Lowered:
            args, kwargs = multi_args(*variant)
            return self._multi_decode.lower(self.state, abstract_kv, *args, **kwargs)

        total = 2 * (len(pairs) + len(samplers) + len(multis))
        # Seconds per phase, for start-up reports: (programs, seconds) of each compile group.
        self.warmup_breakdown: dict[str, tuple[int, float]] = {}

        def phase(name: str, n: int, since: float) -> float:
            now = time.perf_counter()
            self.warmup_breakdown[name] = (n, now - since)
            return now

        with tqdm(total=total, desc="compiling", disable=not progress, unit="program") as bar, \
                ThreadPoolExecutor(max(1, compile_threads), thread_name_prefix="compile") as pool:

            def compile_all(lowerings) -> None:  # lowerings: a generator, lowered as the pool compiles
                for future in [pool.submit(lowered.compile) for lowered in lowerings]:
                    future.result()
                    bar.update()

            self.kv_caches = []  # no cache while compiling (a runner may be warmed up again)
            clock = time.perf_counter()
            compile_all(lower_forward(t, s) for t, s in pairs)
            clock = phase("compile_forward", len(pairs), clock)
            compile_all(lower_sampler(v) for v in samplers)
            clock = phase("compile_sampler", len(samplers), clock)
            compile_all(lower_multi(v) for v in multis)
            clock = phase("compile_multi_step", len(multis), clock)
            self.allocate_kv_cache(num_blocks)
            jax.block_until_ready(self.kv_caches)
            clock = phase("allocate_kv_cache", 0, clock)
            # Each first run timed on its own (70B TP 4: 41 first runs took 55 s, cause unknown).
            self.first_run_seconds: list[tuple[str, float]] = []
            for t, s in pairs:
                buf, layout = self._forward_args(t, s)
                since = time.perf_counter()
                logits, self.kv_caches = self._forward(self.state, self.kv_caches, buf, self.no_prev_tokens, layout=layout)
                jax.block_until_ready(logits)
                self.first_run_seconds.append((f"forward T={t} S={s}", time.perf_counter() - since))
                bar.update()
            clock = phase("first_runs_forward", len(pairs), clock)
            for variant in samplers:
                args, kwargs = sampler_args(*variant)
                jax.block_until_ready(self._sample(*args, **kwargs))
                bar.update()
            clock = phase("first_runs_sampler", len(samplers), clock)
            for variant in multis:
                args, kwargs = multi_args(*variant)
                out, self.kv_caches = self._multi_decode(self.state, self.kv_caches, *args, **kwargs)
                jax.block_until_ready(out)
                bar.update()
            phase("first_runs_multi_step", len(multis), clock)
        return time.perf_counter() - t0

    def model(self) -> CausalLM:
        """The module over the runner's parameters (for references and checks)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, self.state))

    def num_compiled_programs(self) -> int:
        return (self._forward._cache_size() + self._forward_prompt._cache_size() + self._sample._cache_size()
                + self._multi_decode._cache_size())
