"""CoreOutputs' per-client split and merge (an engine process's outputs, one part per
connection), and its pickled size staying plain for a decode step."""

from __future__ import annotations

import pickle

from jaxengine.engine.core_outputs import CoreOutputs, Finish, FirstScheduled, PromptLogprobs, TokenLogprobs
from jaxengine.outputs import Logprob


def test_core_outputs_split_by_owner():
    out = CoreOutputs(
        req_ids=["a", "b-0", "b-1", "c"], token_ids=[1, 2, 3, 4],
        finished={"b-1": Finish(4, None), "c": Finish(3, 7)}, logprobs={"a": TokenLogprobs(-0.5, [1], [-0.5])},
        prompt_logprobs=[PromptLogprobs("b-0", 1, {5: Logprob(-1.0)})], scheduled={"c": FirstScheduled(1.0, 16)},
        done=["c"],
    )
    owner = {"a": 0, "b": 1, "b-0": 1, "b-1": 1}  # "c" has no owner (its client left)
    parts = out.split(owner)
    assert set(parts) == {0, 1}
    assert parts[0].req_ids == ["a"] and parts[0].token_ids == [1] and parts[0].logprobs == out.logprobs
    assert not parts[0].finished and not parts[0].done
    p1 = parts[1]
    assert p1.req_ids == ["b-0", "b-1"] and p1.token_ids == [2, 3] and p1.finished == {"b-1": Finish(4, None)}
    assert p1.prompt_logprobs == out.prompt_logprobs and not p1.scheduled and not p1.done
    merged = CoreOutputs()
    for p in parts.values():
        merged.extend(p)
    assert sorted(merged.req_ids) == ["a", "b-0", "b-1"] and bool(merged) and not CoreOutputs()


def test_core_outputs_round_trip_pickle_with_named_fields():
    out = CoreOutputs(req_ids=["a"], token_ids=[3], finished={"a": Finish(3, "###")},
                      scheduled={"a": FirstScheduled(2.5, 0)})
    back = pickle.loads(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == out
    assert back.finished["a"].stop_reason == "###" and back.scheduled["a"].time == 2.5
