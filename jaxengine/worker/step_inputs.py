"""One step's inputs as the runner's host side hands them to its device side, and its outputs.

`StepInputs` is what `prepare_step` (ModelRunner.prepare) makes of a SchedulerOutput (numpy,
padded to the step's bucket) and what `execute` and the multi-host broadcast take. The forward's arrays travel as ONE packed
int32 buffer (jaxengine.worker.packing): `step_arrays` lists them in packing order and
`unpack_step`, inside the jitted forward, takes them apart again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.core.sched.output import SchedulerOutput
from jaxengine.sample.metadata import SamplerVariant, SamplingTensors, build_sampling_metadata
from jaxengine.worker.compilation import Buckets, pow2_at_least
from jaxengine.worker.input_batch import InputBatch
from jaxengine.worker.packing import Layout, unpack
from models import AttentionMetadata

META_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionMetadata))
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingTensors))


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's host arrays, padded to its bucket, plus the sampler variant."""

    tokens: np.ndarray  # [T] int32
    meta: AttentionMetadata  # numpy leaves
    sampling: SamplingTensors  # numpy leaves, [S] rows
    variant: SamplerVariant
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
class PromptLogprobArrays:
    """Device arrays for StepInputs.prompt_rows: log_softmax of the raw logits."""

    logprobs: jax.Array  # [R] f32, of the actual next prompt token
    top_ids: jax.Array  # [R, MAX_LOGPROBS] i32
    top_logprobs: jax.Array  # [R, MAX_LOGPROBS] f32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiStepOutput:
    """A multi-step decode's sampled tokens; `token_ids` is the last step's row on its own,
    so the next step can start from it without another (eager) device op on the host path."""

    token_ids: jax.Array  # [S_max] i32, the last step's tokens
    all_token_ids: jax.Array  # [num_steps, S_max] i32


def prepare_step(
    out: SchedulerOutput,
    batch: InputBatch,
    buckets: Buckets,
    block_size: int,
    seeds: dict[str, int],  # request id -> its sampling seed
    prev_rows: dict[str, int] | None = None,
) -> StepInputs:
    """Flatten the scheduled requests into the ragged batch (numpy, padded).

    This is on the host's critical path every step, so per-request work is plain Python
    on cached rows (jaxengine.worker.input_batch): a request's block-table row and its
    sampling parameters are built once and touched again only when it gets new blocks.
    `prev_rows`: with async scheduling, the row of each request in the step still
    running, whose sampled token (not yet on the host) is this step's input: the device
    takes it from there."""
    for rid in (*out.finished_req_ids, *out.preempted_req_ids):
        batch.release(rid)
    sched = out.scheduled
    num_seqs = len(sched)
    t_real = out.total_num_scheduled_tokens
    t_pad = buckets.token_bucket(t_real)
    s_pad = buckets.seq_bucket(num_seqs, t_pad)
    bs = block_size

    tokens: list[int] = []
    starts: list[int] = []  # per request: its first position this step
    cu = [0]
    slots: list[int] = []  # per request: its slot in the input batch
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    prompt_slots: list[tuple[str, int]] = []
    pending: list[tuple[int, int]] = []  # (flat row, row in the previous step's output)
    special: list[int] = []  # rows with per-step sampling work
    rows = batch.rows
    for r, s in enumerate(sched):  # ~256 times a step: kept lean (no call on the common path)
        n, start, req = s.num_tokens, s.start_position, s.request
        row = rows.get(req.request_id)
        if row is None or s.is_new or len(s.block_ids) != row.num_blocks:
            row = batch.update(s, seeds)
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

    def padded(values: list[int] | np.ndarray, size: int, fill: int) -> np.ndarray:  # [size] int32
        arr = np.full(size, fill, np.int32)
        arr[: len(values)] = values
        return arr

    # Positions and KV slots of every token at once, from each request's start and its
    # block-table row (no per-token Python: a 4096-token prefill chunk is one numpy op).
    tables = batch.tables[row_slots]  # [s_pad, max_pages]
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
    sampling = build_sampling_metadata(batch.static.take(row_slots), kv_lens, sched, special)
    inputs = StepInputs(tokens=padded(tokens, t_pad, 0), meta=meta, sampling=sampling.tensors,
                        variant=sampling.variant, num_seqs=num_seqs)
    if pending:
        src = np.full(t_pad, -1, np.int32)
        for flat, prev in pending:
            src[flat] = prev
        inputs = dataclasses.replace(inputs, token_src=src)
    if prompt_rows:
        r_pad = pow2_at_least(len(prompt_rows), 16)
        inputs = dataclasses.replace(
            inputs, prompt_rows=padded(prompt_rows, r_pad, 0), prompt_targets=padded(prompt_targets, r_pad, 0),
            prompt_slots=prompt_slots,
        )
    return inputs


def step_arrays(inputs: StepInputs) -> list[np.ndarray]:
    """The forward's host arrays, in `unpack_step`'s order."""
    src = inputs.token_src if inputs.token_src is not None else np.full(inputs.tokens.shape, -1, np.int32)
    return [inputs.tokens, src, *(getattr(inputs.meta, f) for f in META_FIELDS)]


def sampling_arrays(tensors: SamplingTensors) -> list[np.ndarray]:
    """The sampler's host arrays, in `unpack_sampling`'s order."""
    return [getattr(tensors, f) for f in SAMPLING_FIELDS]


def placeholder_step_arrays(t: int, s: int, max_pages: int) -> list[np.ndarray]:
    """`step_arrays` of an empty step of a (T, S) bucket: what warm-up compiles and runs."""
    meta = AttentionMetadata(
        positions=np.zeros(t, np.int32), slot_mapping=np.zeros(t, np.int32),
        kv_lens=np.zeros(s, np.int32), page_indices=np.zeros((s, max_pages), np.int32),
        cu_q_lens=np.zeros(s + 1, np.int32), num_seqs=np.zeros(1, np.int32),
        logits_indices=np.zeros(s, np.int32),
    )
    return [np.zeros(t, np.int32), np.full(t, -1, np.int32), *(getattr(meta, f) for f in META_FIELDS)]


def unpack_step(
    buf: jax.Array,  # [N] int32, pack(step_arrays(inputs))
    layout: Layout,
    prev_token_ids: jax.Array,  # [S_max] int32, the previous step's sampled tokens
) -> tuple[jax.Array, AttentionMetadata]:  # tokens [T], metadata
    tokens, src, *meta = unpack(buf, layout)
    # Async scheduling: tokens sampled by the step still running are taken from its output.
    tokens = jnp.where(src >= 0, prev_token_ids[jnp.maximum(src, 0)], tokens)
    return tokens, AttentionMetadata(**dict(zip(META_FIELDS, meta)))


def unpack_sampling(
    buf: jax.Array,  # [N] int32, pack(sampling_arrays(tensors))
    layout: Layout,
) -> SamplingTensors:
    return SamplingTensors(**dict(zip(SAMPLING_FIELDS, unpack(buf, layout))))
