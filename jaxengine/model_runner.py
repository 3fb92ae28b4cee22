"""ModelRunner: SchedulerOutput -> padded device arrays -> one jitted forward (KV cache
donated) -> on-device sampling -> sampled tokens back on the host.

Shapes are bucketed so XLA compiles a handful of programs at start-up and none in steady
state: the flat token count T is padded up to a power of two (>= 16) and the sequence count
S to one of a few sizes. The forward is compiled per (T, S) bucket; the sampler per S bucket
and per variant (top-k/top-p sort, penalties, logprobs, logit-bias width), the common ones at
start-up, the rest when first used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import pallas_kernels
from jaxengine.sampler import SamplerOutput, SamplingTensors, sample, seed_to_words
from jaxengine.sampling_params import MAX_LOGPROBS
from jaxengine.scheduler import ScheduledRequest, SchedulerOutput
from models import AttentionMetadata, CausalLM


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


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


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_dtype=jnp.bfloat16,
        attention_fn: Callable | None = None,
    ):
        cfg = model.config
        self.config = cfg
        self.block_size = block_size
        self.max_pages = -(-max_model_len // block_size)
        self.graphdef, self.state = nnx.split(model)
        # Committed to the weights' device like every later (donated) cache, so the first
        # call compiles the same program as all the others.
        self.device = jax.tree.leaves(self.state)[0].sharding
        self.kv_caches = [
            jax.device_put(pallas_kernels.init_kv_cache(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype), self.device)
            for _ in range(cfg.num_layers)
        ]
        # T: powers of two up to the token budget; S: a few sizes, never more than T.
        top = _pow2(max_num_batched_tokens, 1)
        self.token_buckets = [b for b in (2**i for i in range(31)) if min(16, top) <= b <= top]
        self.seq_buckets = sorted({min(s, max_num_seqs) for s in (16, 64)} | {max_num_seqs})
        graphdef = self.graphdef

        def forward(state, kv_caches, tokens, meta):  # -> logits [S, V] f32, caches
            model = nnx.merge(graphdef, state)
            hidden, kv_caches = model(tokens, kv_caches, meta, attention_fn)
            return model.compute_logits(hidden[meta.logits_indices]), kv_caches

        self._forward = jax.jit(forward, donate_argnums=(1,))
        self._sample = jax.jit(sample, static_argnames=("num_logprobs", "use_top_k_top_p", "use_penalties", "all_greedy"))

    # ------------------------------------------------------------------ buckets

    def _bucket(self, buckets: list[int], n: int, what: str) -> int:
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"{what} {n} is larger than the largest bucket {buckets[-1]}")

    # ------------------------------------------------------------------ host side

    def prepare(self, out: SchedulerOutput, seeds: dict[str, int]) -> StepInputs:
        """Flatten the scheduled requests into the ragged batch (numpy, padded)."""
        sched = out.scheduled
        num_seqs = len(sched)
        t_real = out.total_num_scheduled_tokens
        t_pad = self._bucket(self.token_buckets, t_real, "scheduled token count")
        s_pad = min(self._bucket(self.seq_buckets, num_seqs, "sequence count"), t_pad)
        bs = self.block_size

        tokens = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        slots = np.arange(t_pad, dtype=np.int32) % bs  # padding writes into the null page
        kv_lens = np.zeros(s_pad, np.int32)
        tables = np.zeros((s_pad, self.max_pages), np.int32)
        cu = np.full(s_pad + 1, t_real, np.int32)
        cu[0] = 0
        logit_rows = np.zeros(s_pad, np.int32)
        offset = 0
        for i, s in enumerate(sched):
            n, start = s.num_tokens, s.start_position
            table = np.asarray(s.block_ids, np.int32)
            tables[i, : len(table)] = table
            pos = np.arange(start, start + n, dtype=np.int32)
            tokens[offset : offset + n] = s.request.all_token_ids[start : start + n]
            positions[offset : offset + n] = pos
            slots[offset : offset + n] = table[pos // bs] * bs + pos % bs
            offset += n
            kv_lens[i] = start + n
            cu[i + 1] = offset
            logit_rows[i] = offset - 1
        meta = AttentionMetadata(
            positions=positions, slot_mapping=slots, kv_lens=kv_lens, page_indices=tables,
            cu_q_lens=cu, num_seqs=np.array([num_seqs], np.int32), logits_indices=logit_rows,
        )
        sampling, flags = self._sampling_tensors(sched, s_pad, seeds)
        return StepInputs(tokens, meta, sampling, *flags, num_seqs)

    def _sampling_tensors(self, sched: list[ScheduledRequest], s_pad: int, seeds: dict[str, int]):
        temperature = np.zeros(s_pad, np.float32)
        top_k = np.zeros(s_pad, np.int32)
        top_p = np.ones(s_pad, np.float32)
        min_p = np.zeros(s_pad, np.float32)
        rep = np.ones(s_pad, np.float32)
        presence = np.zeros(s_pad, np.float32)
        frequency = np.zeros(s_pad, np.float32)
        seed_arr = np.zeros((s_pad, 2), np.uint32)  # (hi, lo) words of a 64-bit seed
        positions = np.zeros(s_pad, np.int32)
        biases: list[dict[int, float]] = []
        penalised: list[int] = []
        num_logprobs = 0
        for i, s in enumerate(sched):
            req = s.request
            p = req.sampling_params
            temperature[i] = p.temperature
            top_k[i] = max(p.top_k, 0)
            top_p[i], min_p[i] = p.top_p, p.min_p
            rep[i], presence[i], frequency[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            seed_arr[i] = seed_to_words(seeds[req.request_id])
            positions[i] = s.start_position + s.num_tokens
            bias = dict(p.logit_bias) if p.logit_bias else {}
            if req.num_output_tokens < p.min_tokens:  # EOS and stop tokens may not end it yet
                for tok in (*p.stop_token_ids, *([] if req.eos_token_id is None else [req.eos_token_id])):
                    bias[tok] = -math.inf
            biases.append(bias)
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                penalised.append(i)
            if p.logprobs:
                num_logprobs = MAX_LOGPROBS
        b = _pow2(max(map(len, biases), default=0), 1)
        bias_ids = np.full((s_pad, b), -1, np.int32)
        bias_vals = np.zeros((s_pad, b), np.float32)
        for i, bias in enumerate(biases):
            if bias:
                bias_ids[i, : len(bias)] = list(bias)
                bias_vals[i, : len(bias)] = list(bias.values())
        length = _pow2(max((sched[i].request.num_tokens for i in penalised), default=1), 1)
        pen_ids = np.full((s_pad, length), -1, np.int32)
        pen_out = np.zeros((s_pad, length), bool)
        for i in penalised:
            req = sched[i].request
            pen_ids[i, : req.num_tokens] = req.all_token_ids
            pen_out[i, req.num_prompt_tokens : req.num_tokens] = True
        use_top_k_top_p = bool((top_k > 0).any() or (top_p < 1).any())
        all_greedy = bool((temperature < 1e-5).all())
        tensors = SamplingTensors(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
            presence_penalty=presence, frequency_penalty=frequency, seeds=seed_arr, positions=positions,
            logit_bias_ids=bias_ids, logit_bias_values=bias_vals, penalty_token_ids=pen_ids, penalty_is_output=pen_out,
        )
        return tensors, (num_logprobs, use_top_k_top_p, bool(penalised), all_greedy)

    # ------------------------------------------------------------------ device side

    def execute(self, inputs: StepInputs) -> SamplerOutput:
        """Dispatch the step; returns device arrays (asynchronous until read)."""
        logits, self.kv_caches = self._forward(self.state, self.kv_caches, inputs.tokens, inputs.meta)
        return self._sample(
            logits, inputs.sampling, num_logprobs=inputs.num_logprobs,
            use_top_k_top_p=inputs.use_top_k_top_p, use_penalties=inputs.use_penalties,
            all_greedy=inputs.all_greedy,
        )

    def warmup(self, progress: bool = True) -> float:
        """Compile every (T, S) forward bucket and the common sampler variants; returns seconds."""
        t0 = time.perf_counter()
        pairs = sorted({(t, min(s, t)) for t in self.token_buckets for s in self.seq_buckets})
        # Per S bucket: all-greedy, temperature only, and top-k/top-p.
        samplers = [(s, k, g) for s in sorted({s for _, s in pairs}) for k, g in ((False, True), (False, False), (True, False))]
        with tqdm(total=len(pairs) + len(samplers), desc="compiling", disable=not progress, unit="program") as bar:
            for t, s in pairs:
                meta = AttentionMetadata(
                    positions=np.zeros(t, np.int32), slot_mapping=np.zeros(t, np.int32),
                    kv_lens=np.zeros(s, np.int32), page_indices=np.zeros((s, self.max_pages), np.int32),
                    cu_q_lens=np.zeros(s + 1, np.int32), num_seqs=np.zeros(1, np.int32),
                    logits_indices=np.zeros(s, np.int32),
                )
                logits, self.kv_caches = self._forward(self.state, self.kv_caches, np.zeros(t, np.int32), meta)
                bar.update()
            jax.block_until_ready(self.kv_caches)
            for s, use_top_k_top_p, all_greedy in samplers:
                tensors, _ = self._sampling_tensors([], s, {})
                logits = jax.device_put(jnp.zeros((s, self.config.vocab_size), jnp.float32), self.device)
                jax.block_until_ready(self._sample(
                    logits, tensors, num_logprobs=0, use_top_k_top_p=use_top_k_top_p, use_penalties=False,
                    all_greedy=all_greedy))
                bar.update()
        return time.perf_counter() - t0

    def num_compiled_programs(self) -> int:
        return self._forward._cache_size() + self._sample._cache_size()
