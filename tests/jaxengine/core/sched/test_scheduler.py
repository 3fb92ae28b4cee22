import pytest

from jaxengine.core.request import Request, RequestStatus
from jaxengine.sampling_params import SamplingParams
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig

EOS = 2


def make_sched(**kw):
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, block_size=4,
               num_blocks=32)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def req(rid, prompt, arrival=0.0, priority=0, **params):
    params.setdefault("max_tokens", 8)
    return Request(rid, prompt, SamplingParams(**params), arrival_time=arrival,
                   priority=priority, eos_token_id=EOS)


def step(s, token=7, tokens=None):
    """schedule + a fake model that samples `token` (or tokens[rid]) for every sampler."""
    out = s.schedule()
    sampled = {x.request.request_id: [tokens.get(x.request.request_id, token) if tokens else token]
               for x in out.scheduled if x.sample}
    s.update(out, sampled)
    return out


def summary(out):
    return [(x.request.request_id, x.start_position, x.num_tokens, x.sample) for x in out.scheduled]


# ------------------------------------------------------------------ admission


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], {}, "the prompt is empty"),
        (list(range(64)), {}, "leaves no room to generate under max_model_len=64"),
        (list(range(60)), {"max_tokens": 5}, "= 65 exceeds max_model_len=64"),
        ([1], {"n": 2}, "fan it out first"),
    ],
)
def test_admission_errors(prompt, params, message):
    s = make_sched()
    with pytest.raises(ValueError, match=message):
        s.add_request(req("r", prompt, **params))
    assert not s.has_unfinished_requests() and s.num_waiting == 0


def test_admission_rejects_more_blocks_than_pool():
    s = make_sched(num_blocks=5)  # 4 usable blocks = 16 tokens
    # 10 prompt + 7 output - 1 (last token never computed) = 16 tokens: fits exactly.
    s.add_request(req("ok", list(range(10)), max_tokens=7))
    with pytest.raises(ValueError, match=r"may need 5 KV blocks .* the pool has only 4"):
        s.add_request(req("big", list(range(10)), max_tokens=8))
    with pytest.raises(ValueError, match="already in the scheduler"):
        s.add_request(req("ok", [1]))


def test_max_tokens_none_resolves_to_model_len():
    s = make_sched(max_model_len=12)
    r = req("r", list(range(5)), max_tokens=None)
    s.add_request(r)
    assert r.max_tokens == 7
    steps = 0
    while s.has_unfinished_requests():
        step(s)
        steps += 1
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_tokens == 12


def test_config_validation():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="policy must be 'fcfs' or 'priority', got 'lifo'"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 2"):
        SchedulerConfig(num_blocks=1)


# ------------------------------------------------------------------ schedule / update


def test_basic_prefill_then_decode():
    s = make_sched()
    s.add_request(req("a", [10, 11, 12, 13, 14]))
    s.add_request(req("b", [20, 21, 22]))
    out = s.schedule()
    assert summary(out) == [("a", 0, 5, True), ("b", 0, 3, True)]
    assert out.total_num_scheduled_tokens == 8
    a, b = out.scheduled
    assert list(a.block_ids) == [1, 2] and list(a.new_block_ids) == [1, 2] and a.is_new
    assert list(b.block_ids) == [3] and list(b.new_block_ids) == [3]
    assert out.preempted_req_ids == [] and out.finished_req_ids == set()
    changed = s.update(out, {"a": [100], "b": [200]})
    assert [r.request_id for r in changed] == ["a", "b"]
    ra = a.request
    assert ra.output_token_ids == [100] and ra.all_token_ids == [10, 11, 12, 13, 14, 100]
    assert ra.num_computed_tokens == 5 and ra.num_tokens == 6
    out = s.schedule()
    assert summary(out) == [("a", 5, 1, True), ("b", 3, 1, True)]
    assert list(out.scheduled[0].new_block_ids) == [] and not out.scheduled[0].is_new
    # b's 4th token fills its block: the 5th needs a new one.
    s.update(out, {"a": [101], "b": [201]})
    out = s.schedule()
    assert list(out.scheduled[1].new_block_ids) == [4] and list(out.scheduled[1].block_ids) == [3, 4]
    assert s.num_running == 2 and s.num_waiting == 0


def test_chunked_prefill_across_steps_and_decodes_first():
    s = make_sched(max_num_seqs=4, max_num_batched_tokens=4)
    s.add_request(req("a", [1, 1]))
    s.add_request(req("long", list(range(100, 110))))  # 10 tokens
    out = step(s)
    assert summary(out) == [("a", 0, 2, True), ("long", 0, 2, False)]
    out = step(s)  # decode of a first, then 3 more prompt tokens
    assert summary(out) == [("a", 2, 1, True), ("long", 2, 3, False)]
    out = step(s)
    assert summary(out) == [("a", 3, 1, True), ("long", 5, 3, False)]
    out = step(s)
    assert summary(out) == [("a", 4, 1, True), ("long", 8, 2, True)]
    long_req = out.scheduled[1].request
    assert long_req.output_token_ids == [7] and long_req.num_computed_tokens == 10
    out = step(s)
    assert summary(out) == [("a", 5, 1, True), ("long", 10, 1, True)]


def test_long_prefill_token_threshold():
    s = make_sched(max_num_batched_tokens=64, long_prefill_token_threshold=4)
    s.add_request(req("a", list(range(10))))
    s.add_request(req("b", list(range(50, 53))))
    assert summary(step(s)) == [("a", 0, 4, False), ("b", 0, 3, True)]
    assert summary(step(s)) == [("a", 4, 4, False), ("b", 3, 1, True)]


def test_max_num_seqs_limits_admission():
    s = make_sched(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", [1, 2, 3], arrival=i))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["r0", "r1"]
    assert s.num_running == 2 and s.num_waiting == 1


def test_prefix_hit_counts_as_computed():
    s = make_sched()
    prefix = list(range(100, 108))  # 2 full blocks
    s.add_request(req("a", prefix + [1, 2]))
    out = step(s)
    assert list(out.scheduled[0].block_ids) == [1, 2, 3]
    s.add_request(req("b", prefix + [5]))
    out = step(s)
    assert summary(out) == [("a", 10, 1, True), ("b", 8, 1, True)]
    b = out.scheduled[1]
    assert list(b.block_ids) == [1, 2, 4] and list(b.new_block_ids) == [1, 2, 4]
    assert b.request.num_cached_tokens == 8
    stats = s.make_stats()
    assert stats.prefix_cache_queries == 10 + 9 and stats.prefix_cache_hits == 8


def test_n_children_share_prompt_blocks_in_the_same_step():
    s = make_sched()
    parent = Request("p", list(range(9)), SamplingParams(n=3, max_tokens=4, seed=5))
    children = parent.fan_out()
    assert [c.request_id for c in children] == ["p-0", "p-1", "p-2"]
    assert [c.sampling_params.seed for c in children] == [5, 6, 7]
    assert all(c.parent_request_id == "p" and c.sampling_params.n == 1 for c in children)
    for c in children:
        s.add_request(c)
    out = s.schedule()
    assert summary(out) == [("p-0", 0, 9, True), ("p-1", 8, 1, True), ("p-2", 8, 1, True)]
    assert [list(x.block_ids) for x in out.scheduled] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]


def test_preempts_newest_running_and_resumes():
    # 5 usable blocks of 4 tokens. a: 4 prompt tokens, b: 8 prompt tokens.
    s = make_sched(num_blocks=6, max_model_len=20)
    s.add_request(req("a", [1, 2, 3, 4], arrival=0, max_tokens=12))
    s.add_request(req("b", list(range(10, 18)), arrival=1, max_tokens=12))
    out = step(s)  # a: block 1, b: blocks 2, 3
    assert [list(x.block_ids) for x in out.scheduled] == [[1], [2, 3]]
    out = step(s)  # a needs block 4, b needs block 5: pool now full
    assert [list(x.block_ids) for x in out.scheduled] == [[1, 4], [2, 3, 5]]
    for _ in range(3):
        step(s)
    a_req, b_req = s.requests["a"], s.requests["b"]
    assert a_req.num_tokens == 9 and b_req.num_tokens == 13
    # a needs a 3rd block, none free: the newest (b) is preempted and a gets b's freed tail.
    out = s.schedule()
    assert out.preempted_req_ids == ["b"] and summary(out) == [("a", 8, 1, True)]
    assert list(out.scheduled[0].new_block_ids) == [5]
    assert b_req.status == RequestStatus.PREEMPTED and b_req.num_computed_tokens == 0
    assert b_req.output_token_ids == [7] * 5  # generated tokens kept
    assert s.get_block_ids("b") == [] and s.num_waiting == 1 and b_req.num_preemptions == 1
    s.update(out, {"a": [7]})
    assert s.make_stats().num_preemptions == 1
    # b is admitted back once a finishes; its full blocks may come back as prefix hits.
    while a_req.status == RequestStatus.RUNNING:
        out = step(s)
        assert "b" not in [x.request.request_id for x in out.scheduled] or a_req.is_finished
    while s.has_unfinished_requests():
        step(s)
    assert b_req.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert b_req.output_token_ids == [7] * 12 and b_req.num_tokens == 20
    assert s.kv_cache_manager.num_free_blocks == 5


def test_preemption_of_several_keeps_arrival_order_at_front():
    s = make_sched(num_blocks=4, max_num_seqs=4, max_model_len=12)  # 3 usable blocks
    for i, rid in enumerate("abc"):
        s.add_request(req(rid, [10 * i + 1, 10 * i + 2, 10 * i + 3, 10 * i + 4], arrival=i,
                          max_tokens=5))
    s.add_request(req("d", [99], arrival=3, max_tokens=1))
    out = step(s)
    assert [list(x.block_ids) for x in out.scheduled] == [[1], [2], [3]]  # d waits: no block
    # Every request now needs a 2nd block. a takes c's (newest), then b is the newest.
    out = s.schedule()
    assert out.preempted_req_ids == ["c", "b"] and summary(out) == [("a", 4, 1, True)]
    assert list(out.scheduled[0].new_block_ids) == [3]
    assert [r.request_id for r in s.waiting] == ["b", "c", "d"]
    assert all(r.status == RequestStatus.PREEMPTED for r in list(s.waiting)[:2])
    s.update(out, {"a": [7]})
    while s.has_unfinished_requests():
        step(s)
    assert s.kv_cache_manager.num_free_blocks == 3


def test_priority_policy_order_and_victim():
    s = make_sched(policy="priority", max_num_seqs=2)
    s.add_request(req("low", [1], arrival=0, priority=5))
    s.add_request(req("high", [2], arrival=1, priority=0))
    s.add_request(req("mid", [3], arrival=2, priority=1))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["high", "mid"]
    # Victim: the lowest priority, even when it is older and already in this step's batch.
    s2 = make_sched(policy="priority", num_blocks=4, max_model_len=12)  # 3 usable blocks
    s2.add_request(req("low", [1, 2, 3, 4], arrival=0, priority=9, max_tokens=5))
    assert summary(step(s2)) == [("low", 0, 4, True)]
    s2.add_request(req("high", [5, 6, 7, 8], arrival=1, priority=0, max_tokens=5))
    out = step(s2)
    assert summary(out) == [("low", 4, 1, True), ("high", 0, 4, True)]
    assert [list(x.block_ids) for x in out.scheduled] == [[1, 2], [3]]
    out = s2.schedule()  # low fits in block 2; high needs a block: low is preempted, refunded
    assert out.preempted_req_ids == ["low"]
    assert summary(out) == [("high", 4, 1, True)] and out.total_num_scheduled_tokens == 1
    assert list(out.scheduled[0].new_block_ids) == [2]  # low's blocks freed tail-first: 2, then 1
    s2.update(out, {"high": [7]})
    while s2.has_unfinished_requests():
        step(s2)
    assert s2.kv_cache_manager.num_free_blocks == 3


# ------------------------------------------------------------------ stop conditions


def run_one(s, r, tokens):
    s.add_request(r)
    it = iter(tokens)
    while r.status == RequestStatus.WAITING or r.status == RequestStatus.RUNNING:
        out = s.schedule()
        s.update(out, {x.request.request_id: [next(it)] for x in out.scheduled if x.sample})
    return r


def test_stop_on_eos_unless_ignored():
    r = run_one(make_sched(), req("r", [1]), [5, EOS, 6])
    assert r.status == RequestStatus.FINISHED_STOPPED and r.output_token_ids == [5, EOS]
    assert r.stop_reason is None and r.status.finish_reason == "stop"
    r = run_one(make_sched(), req("r", [1], ignore_eos=True, max_tokens=3), [5, EOS, 6, 9])
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.output_token_ids == [5, EOS, 6]
    assert r.status.finish_reason == "length"


def test_stop_token_ids_and_min_tokens():
    r = run_one(make_sched(), req("r", [1], stop_token_ids=[9]), [5, 9, 6])
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 9
    r = run_one(make_sched(), req("r", [1], stop_token_ids=[9], min_tokens=3), [9, EOS, 9, 9, 4])
    assert r.output_token_ids == [9, EOS, 9] and r.stop_reason == 9


def test_max_tokens_and_frees_blocks():
    s = make_sched()
    r = run_one(s, req("r", list(range(6)), max_tokens=4), [5] * 10)
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == 4
    assert s.kv_cache_manager.num_free_blocks == 31 and not s.has_unfinished_requests()
    assert s.schedule().finished_req_ids == {"r"}
    assert s.schedule().finished_req_ids == set()


def test_multi_token_update_stops_at_first_stop():
    s = make_sched()
    s.add_request(req("r", [1], max_tokens=8))
    out = s.schedule()
    s.update(out, {"r": [4, EOS, 5]})  # e.g. speculative tokens
    r = out.scheduled[0].request
    assert r.output_token_ids == [4, EOS] and r.is_finished


# ------------------------------------------------------------------ aborts


def test_abort_running_and_waiting_frees_blocks():
    s = make_sched(max_num_seqs=1)
    s.add_request(req("a", list(range(9))))
    s.add_request(req("b", [1]))
    out = step(s)
    assert s.get_block_ids("a") == [1, 2, 3] and s.num_waiting == 1
    s.finish_requests(["a", "b", "unknown"])
    assert s.kv_cache_manager.num_free_blocks == 31 and s.num_running == 0 and s.num_waiting == 0
    a = out.scheduled[0].request
    assert a.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    out = s.schedule()
    assert out.scheduled == [] and out.finished_req_ids == {"a", "b"}
    assert not s.has_unfinished_requests()


def test_abort_between_schedule_and_update():
    s = make_sched()
    s.add_request(req("a", [1, 2]))
    s.add_request(req("b", [3, 4]))
    out = s.schedule()
    s.finish_requests("a")
    changed = s.update(out, {"a": [5], "b": [6]})
    assert [r.request_id for r in changed] == ["b"]
    assert out.scheduled[0].request.output_token_ids == []
    assert s.kv_cache_manager.num_free_blocks == 30


def test_stop_string_finish_from_engine():
    s = make_sched()
    s.add_request(req("a", [1, 2]))
    step(s)
    s.finish_requests("a", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert not s.has_unfinished_requests()
    with pytest.raises(ValueError, match="finished status"):
        s.finish_requests("a", RequestStatus.RUNNING)


# ------------------------------------------------------------------ multi-step eligibility


def test_decode_steps_only_when_every_running_request_decodes():
    s = make_sched(max_num_seqs=2)
    assert s.decode_steps(4) == 1  # nothing runs
    s.add_request(req("a", [1, 2, 3]))
    s.add_request(req("b", [4, 5]))
    step(s)  # both prefill and sample their first token
    assert s.decode_steps(4) == 4 and s.decode_steps(1) == 1
    s.add_request(req("c", [6]))  # waits, but both seats are taken: runs may go on
    assert s.decode_steps(4) == 4
    s.finish_requests("b")  # a seat is free for c: admit it first
    assert s.decode_steps(4) == 1
    s.finish_requests("c")
    s.add_request(req("d", [7], logprobs=0))
    step(s)  # d admitted; its logprobs come from single steps
    assert s.decode_steps(4) == 1
