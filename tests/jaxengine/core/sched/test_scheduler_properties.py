"""Random drivers for the scheduler: random arrivals, lengths, aborts and tiny pools.

A fake model keeps a paged "KV cache" of token ids: each step it writes the scheduled
tokens into the slots the block tables give, then reads every scheduled request's whole
context back through its block table and checks it equals the request's tokens. So a
wrong block table, a bad prefix hit or a block handed out twice shows up as wrong
"KV", exactly as it would corrupt a real model's output. The sampled token is a
deterministic function of the context, so outputs must not depend on batching,
chunking, preemption or prefix hits: they are compared with a solo reference.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxengine.core.request import Request, RequestStatus
from jaxengine.sampling_params import SamplingParams
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig

EOS = 1
VOCAB = 6


def next_token(context: list[int]) -> int:
    """Deterministic 'greedy' model: depends on the whole context."""
    h = 0
    for t in context:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


class FakeKVModel:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]

    def run(self, out) -> dict[str, list[int]]:
        bs = self.bs
        for s in out.scheduled:  # all writes of the step first (as each layer does) ...
            toks = s.request.all_token_ids
            for pos in range(s.start_position, s.start_position + s.num_tokens):
                blk = s.block_ids[pos // bs]
                assert blk != 0, "null block in a block table"
                self.kv[blk][pos % bs] = toks[pos]
        sampled = {}
        for s in out.scheduled:  # ... then every read
            end = s.start_position + s.num_tokens
            ctx = [self.kv[s.block_ids[p // bs]][p % bs] for p in range(end)]
            assert ctx == s.request.all_token_ids[:end], f"corrupt KV for {s.request}"
            if s.sample:
                sampled[s.request.request_id] = [next_token(ctx)]
        return sampled


def reference_output(prompt: list[int], max_tokens: int, ignore_eos: bool, min_tokens: int):
    ctx, out = list(prompt), []
    while True:
        t = next_token(ctx)
        ctx.append(t)
        out.append(t)
        if len(out) >= max_tokens:
            return out, RequestStatus.FINISHED_LENGTH_CAPPED
        if t == EOS and not ignore_eos and len(out) >= min_tokens:
            return out, RequestStatus.FINISHED_STOPPED


def check_invariants(s: Scheduler, out=None) -> None:
    cfg = s.config
    kv = s.kv_cache_manager
    pool = kv.block_pool
    bs = cfg.block_size
    owners: dict[int, int] = {}
    for rid, blocks in kv.req_to_blocks.items():
        req = s.requests[rid]
        assert req.status == RequestStatus.RUNNING, "only running requests hold blocks"
        ids = [b.block_id for b in blocks]
        assert tuple(ids) == kv.req_to_block_ids[rid]
        assert len(set(ids)) == len(ids), "a block twice in one table"
        assert 0 not in ids, "null block handed out"
        for j, b in enumerate(blocks):
            owners[b.block_id] = owners.get(b.block_id, 0) + 1
            if b.block_hash is not None:  # a shared, read-only block: its content must match
                assert b.token_ids == tuple(req.all_token_ids[j * bs : (j + 1) * bs])
        # Enough blocks for what is computed, and not more than one spare block's worth.
        assert len(blocks) * bs >= req.num_computed_tokens
    for b in pool.blocks[1:]:
        n = owners.get(b.block_id, 0)
        assert b.ref_cnt == n, f"{b}: ref_cnt {b.ref_cnt} != {n} owners"
        if n > 1:
            assert b.block_hash is not None, "a writable (uncached) block owned twice"
        in_queue = b.prev_free is not None
        assert in_queue == (n == 0)
    free = pool.free_block_queue.get_all_free_blocks()
    assert len(free) == pool.num_free_blocks
    assert pool.num_free_blocks + len(owners) == cfg.num_blocks - 1, "free + used != total"
    for h, b in pool.cached_blocks.items():
        assert b.block_hash == h
    assert len(s.running) <= cfg.max_num_seqs
    for r in s.running:
        assert r.status == RequestStatus.RUNNING and r.num_computed_tokens <= r.num_tokens
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0 and r.request_id not in kv.req_to_blocks
    assert len(s.running) + len(s.waiting) == len(s.requests)
    if out is not None:
        assert out.total_num_scheduled_tokens == sum(x.num_tokens for x in out.scheduled)
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        assert len({x.request.request_id for x in out.scheduled}) == len(out.scheduled)
        for x in out.scheduled:
            assert x.num_tokens >= 1
            assert x.start_position + x.num_tokens <= x.request.num_tokens
            assert len(x.block_ids) * bs >= x.start_position + x.num_tokens
            assert x.sample == (x.start_position + x.num_tokens == x.request.num_tokens)
            if cfg.long_prefill_token_threshold:
                assert x.num_tokens <= cfg.long_prefill_token_threshold


def drive(cfg: SchedulerConfig, specs: list[dict], aborts: dict[int, list[int]]) -> None:
    """specs: arrival step, prompt, max_tokens, ... ; aborts: step -> spec indices."""
    s = Scheduler(cfg)
    model = FakeKVModel(cfg.num_blocks, cfg.block_size)
    reqs: list[Request | None] = [None] * len(specs)
    by_step: dict[int, list[int]] = {}
    for i, sp in enumerate(specs):
        by_step.setdefault(sp["arrival"], []).append(i)
    last_arrival = max(sp["arrival"] for sp in specs)
    # Progress bound: under FCFS the oldest running request computes >= 1 token per step
    # and is never preempted, so each request needs at most prompt + max_tokens steps
    # once it is the oldest. Priority can spend a step only preempting: allow twice.
    work = sum(len(sp["prompt"]) + sp["max_tokens"] for sp in specs)
    bound = last_arrival + (1 if cfg.policy == "fcfs" else 2) * work + len(specs) + 2
    aborted = set()
    step = 0
    while step <= last_arrival or s.has_unfinished_requests():
        for i in by_step.get(step, ()):
            sp = specs[i]
            r = Request(
                f"r{i}", sp["prompt"],
                SamplingParams(max_tokens=sp["max_tokens"], ignore_eos=sp["ignore_eos"],
                               min_tokens=sp["min_tokens"]),
                arrival_time=float(step), priority=sp["priority"], eos_token_id=EOS,
            )
            s.add_request(r)
            reqs[i] = r
        for i in aborts.get(step, ()):
            if reqs[i] is not None and not reqs[i].is_finished:
                aborted.add(i)
            if reqs[i] is not None:
                s.finish_requests(reqs[i].request_id)
        check_invariants(s)
        out = s.schedule()
        check_invariants(s, out)
        # An abort can also land between schedule() and update().
        for i in aborts.get(-step - 1, ()):
            if reqs[i] is not None and not reqs[i].is_finished:
                aborted.add(i)
                s.finish_requests(reqs[i].request_id)
        s.update(out, model.run(out))
        check_invariants(s)
        step += 1
        assert step <= bound, f"no progress: {s.num_running} running, {s.num_waiting} waiting"
    pool = s.kv_cache_manager.block_pool
    assert pool.num_free_blocks == cfg.num_blocks - 1, "blocks leaked"
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert s.running == [] and len(s.waiting) == 0
    for i, (sp, r) in enumerate(zip(specs, reqs)):
        if i in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        expect, status = reference_output(sp["prompt"], sp["max_tokens"], sp["ignore_eos"],
                                          sp["min_tokens"])
        assert r.output_token_ids == expect and r.status == status, r


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_num_seqs = draw(st.integers(1, 5))
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 24)),
        max_model_len=32,
        block_size=block_size,
        num_blocks=draw(st.integers(2, 24)),
        enable_prefix_caching=draw(st.booleans()),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        long_prefill_token_threshold=draw(st.one_of(st.none(), st.integers(1, 8))),
    )
    usable_tokens = (cfg.num_blocks - 1) * block_size
    specs = []
    # Small alphabets and a shared stem make prefix hits frequent.
    stem = draw(st.lists(st.integers(2, 4), min_size=0, max_size=8))
    for _ in range(draw(st.integers(1, 8))):
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=12))
        prompt = (stem[: draw(st.integers(0, len(stem)))] + tail) or [3]
        max_tokens = draw(st.integers(1, 12))
        # Keep the request admissible (admission errors have their own tests).
        prompt = prompt[: max(1, min(31 - max_tokens, usable_tokens - max_tokens + 1))]
        if len(prompt) + max_tokens - 1 > usable_tokens or len(prompt) + max_tokens > 32:
            max_tokens = max(1, min(32 - len(prompt), usable_tokens - len(prompt) + 1))
        if len(prompt) + max_tokens - 1 > usable_tokens:
            continue
        specs.append(dict(
            arrival=draw(st.integers(0, 6)), prompt=prompt, max_tokens=max_tokens,
            ignore_eos=draw(st.booleans()), min_tokens=draw(st.integers(0, max_tokens)),
            priority=draw(st.integers(0, 2)),
        ))
    if not specs:
        specs.append(dict(arrival=0, prompt=[3], max_tokens=1, ignore_eos=True, min_tokens=0,
                          priority=0))
    aborts: dict[int, list[int]] = {}
    for _ in range(draw(st.integers(0, 3))):
        # Negative keys: abort between that step's schedule() and update().
        at = draw(st.integers(-12, 12))
        aborts.setdefault(at, []).append(draw(st.integers(0, len(specs) - 1)))
    return cfg, specs, aborts


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_scenarios(scenario):
    drive(*scenario)


def test_larger_random_runs():
    """A few longer seeded runs: more requests, more pressure, than hypothesis draws."""
    for seed in range(6):
        rng = random.Random(seed)
        bs = rng.choice([2, 4, 8])
        cfg = SchedulerConfig(
            max_num_seqs=rng.choice([4, 8, 16]), max_num_batched_tokens=64, max_model_len=96,
            block_size=bs, num_blocks=96 // bs + rng.randint(1, 12),
            policy="fcfs" if seed % 2 == 0 else "priority",
            long_prefill_token_threshold=rng.choice([None, 16]),
        )
        stems = [[rng.randint(2, 5) for _ in range(rng.randint(0, 40))] for _ in range(3)]
        specs = []
        for i in range(60):
            prompt = (rng.choice(stems) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 30))]) or [2]
            max_tokens = rng.randint(1, min(40, 96 - len(prompt)))
            specs.append(dict(arrival=rng.randint(0, 80), prompt=prompt, max_tokens=max_tokens,
                              ignore_eos=rng.random() < 0.7, min_tokens=rng.randint(0, max_tokens),
                              priority=rng.randint(0, 3)))
        aborts: dict[int, list[int]] = {}
        for _ in range(8):
            aborts.setdefault(rng.randint(-120, 120), []).append(rng.randrange(len(specs)))
        drive(cfg, specs, aborts)
