"""Multi-step decode (`num_scheduler_steps` > 1) on CPU: the same tokens as transformers'
greedy `generate` and as single-step decoding, with the runs really taken; stops inside a
run; seeded sampling unchanged; stop strings; abort; no recompilation after warm-up."""

import numpy as np
import pytest

from jaxengine import SamplingParams
from tests.jaxengine.engine.test_engine_e2e import (  # noqa: F401
    GREEDY, NEW, PROMPTS, _llm, _tokens, check_max_tokens_and_stop_token, checkpoint,
)

STEPS = 4


@pytest.fixture(scope="module")
def multi(checkpoint):  # noqa: F811
    llm = _llm(checkpoint[0], num_scheduler_steps=STEPS)
    runs = []
    execute_multi = llm.engine.runner.execute_multi

    def counted(inputs, num_steps, *prev):
        runs.append(num_steps)
        return execute_multi(inputs, num_steps, *prev)

    llm.engine.runner.execute_multi = counted
    llm.runs = runs
    return llm


def test_greedy_matches_transformers_in_multi_step_runs(multi, checkpoint):  # noqa: F811
    multi.runs.clear()
    outs = multi.generate(PROMPTS, GREEDY)
    assert _tokens(outs) == checkpoint[1]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    # 24 tokens each: after the prefill steps, most decode steps ran STEPS at a time.
    assert multi.runs and set(multi.runs) == {STEPS}
    assert len(multi.runs) * STEPS >= NEW // 2


def test_chunked_prefill_preemption_and_sync_scheduling_with_multi_step(checkpoint):  # noqa: F811
    for extra in (dict(max_num_batched_tokens=8, max_num_seqs=4), dict(num_kv_blocks=10), dict(async_scheduling=False)):
        llm = _llm(checkpoint[0], num_scheduler_steps=STEPS, **extra)
        assert _tokens(llm.generate(PROMPTS, GREEDY)) == checkpoint[1]


def test_multi_step_runs_while_requests_wait_for_a_seat(checkpoint):  # noqa: F811
    # 5 requests, 2 seats: the running pair decodes in runs while 3 wait; a seat freed
    # inside a run is filled after it.
    llm = _llm(checkpoint[0], num_scheduler_steps=STEPS, max_num_seqs=2)
    runs, waiting = [], []
    execute_multi = llm.engine.runner.execute_multi

    def counted(inputs, num_steps, *prev):
        runs.append(num_steps)
        waiting.append(llm.engine.scheduler.num_waiting)
        return execute_multi(inputs, num_steps, *prev)

    llm.engine.runner.execute_multi = counted
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == checkpoint[1]
    assert runs and max(waiting) > 0


def test_stops_inside_a_run(multi, checkpoint):  # noqa: F811
    # max_tokens 7 (not a multiple of the run length) and a stop token from the middle of
    # the output: the run's later tokens are dropped, and the blocks freed.
    check_max_tokens_and_stop_token(multi, checkpoint[1][0], 7, 9)
    assert multi.engine.scheduler.kv_cache_manager.block_pool.usage == 0


def test_near_max_model_len_and_n_samples_same_as_single_step(checkpoint):  # noqa: F811
    # max_model_len 40: the 25-token prompt has room for 15 tokens, and a run from 37 tokens
    # on would overrun the model length: those steps run singly, and it ends at 40.
    multi, single = (_llm(checkpoint[0], max_model_len=40, **kw) for kw in (dict(num_scheduler_steps=STEPS), {}))
    params = [SamplingParams(max_tokens=15, temperature=0), SamplingParams(n=3, max_tokens=15, temperature=1.0, seed=5)]
    for p in params:
        got, want = multi.generate(PROMPTS[3:], p), single.generate(PROMPTS[3:], p)
        assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
    assert len(got[0].prompt_token_ids) + len(got[0].outputs[0].token_ids) == 40
    assert multi.engine.step_timing().multi_step_runs > 0


def test_seeded_sampling_same_as_single_step(multi, checkpoint):  # noqa: F811
    single = _llm(checkpoint[0])
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, top_k=50, seed=7 + i) for i in range(len(PROMPTS))]
    multi.runs.clear()
    got = _tokens(multi.generate(PROMPTS, params))
    assert multi.runs
    assert got == _tokens(single.generate(PROMPTS, params))


def test_per_step_sampling_work_falls_back_to_single_steps(multi, checkpoint):  # noqa: F811
    multi.runs.clear()
    out = multi.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0, logprobs=2))[0].outputs[0]
    assert out.token_ids == checkpoint[1][0] and len(out.logprobs) == NEW
    assert not multi.runs


def test_abort_inside_a_run_frees_every_block(multi):
    engine = multi.engine
    pool = engine.scheduler.kv_cache_manager.block_pool
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, SamplingParams(max_tokens=NEW, temperature=0), request_id=f"a{i}")
    for _ in range(6):
        engine.step()
    engine.abort_request([f"a{i}" for i in range(len(PROMPTS))])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.usage == 0 and engine.scheduler.num_running == 0


def test_no_recompilation_after_warmup_with_multi_step(multi):
    compiled = multi.engine.runner.num_compiled_programs()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, rng.integers(1, 60)).tolist() for _ in range(12)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0.0, 0.8])),
                             top_k=int(rng.choice([-1, 20])), seed=i) for i in range(12)]
    multi.runs.clear()
    multi.generate(prompts, params)
    assert multi.runs
    assert multi.engine.runner.num_compiled_programs() == compiled
