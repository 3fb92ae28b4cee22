"""The one owner of requests and their n > 1 samples: RequestTable's ids, and CoreRequests
fanning out, seeding, aborting, stopping and reporting a request done once all its samples are."""

from __future__ import annotations

import pytest

from jaxengine.core.request import Request, RequestStatus
from jaxengine.core.request_table import CoreRequests, RequestTable
from jaxengine.core.sched.scheduler import Scheduler, SchedulerConfig
from jaxengine.sampling_params import SamplingParams


def _requests() -> CoreRequests:
    return CoreRequests(Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                                                  block_size=4, num_blocks=32)), seed=0)


def test_table_sample_ids_and_removal():
    t: RequestTable[str, int] = RequestTable()
    assert t.add("a", "A", [0]) == ["a"]  # n == 1: the request is its own sample
    assert t.add("b", "B", [0, 1, 2]) == ["b-0", "b-1", "b-2"]
    with pytest.raises(ValueError, match="already in use"):
        t.add("a", "again", [0])
    assert "b" in t and len(t) == 2 and list(t) == ["a", "b"] and t.samples["b-1"] == 1
    assert t.remove_sample("b-0") == 0 and t.remove("b") == "B"
    assert "b" not in t and set(t.samples) == {"a"} and t.remove("b") is None


def test_fan_out_seeds_and_done_after_the_last_sample():
    r = _requests()
    ids = r.add(Request("x", [1, 2, 3], SamplingParams(n=3, seed=10, max_tokens=4)))
    assert ids == ["x-0", "x-1", "x-2"] and [r.seeds[i] for i in ids] == [10, 11, 12]
    r.add(Request("y", [4, 5], SamplingParams(max_tokens=4, repetition_penalty=1.5)))  # an engine seed
    assert r.num_penalised == 1 and isinstance(r.seeds["y"], int)
    assert r.scheduler.num_waiting == 4
    r.stop("x-1", "###")
    samples = r.take_finished_outside()
    assert [s.request_id for s in samples] == ["x-1"] and samples[0].stop_reason == "###"
    assert r.finish(samples[0]) is None and "x-1" not in r.seeds  # x-0 and x-2 still run
    r.abort(["x", "y", "unknown"])
    aborted = r.take_finished_outside()
    assert sorted(s.request_id for s in aborted) == ["x-0", "x-2", "y"]
    assert all(s.status == RequestStatus.FINISHED_ABORTED for s in aborted)
    # x is done at its first sample reported here (all three have finished by then).
    assert [r.finish(s) for s in aborted] == ["x", None, "y"]
    assert not r and not r.seeds and r.num_penalised == 0 and r.scheduler.num_waiting == 0


def test_a_request_that_cannot_run_leaves_nothing_behind():
    r = _requests()
    with pytest.raises(ValueError, match="max_model_len"):
        r.add(Request("z", list(range(70)), SamplingParams(n=2, max_tokens=1)))
    assert not r and not r.scheduler.has_unfinished_requests()
