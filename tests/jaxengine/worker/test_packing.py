"""One packed int32 buffer per jitted call (jaxengine.worker.packing), and CoreOutputs' per-client split."""

from __future__ import annotations

import jax
import numpy as np

from jaxengine.engine.core import CoreOutputs
from jaxengine.outputs import Logprob
from jaxengine.worker.packing import pack, unpack


def test_pack_unpack_round_trips_every_dtype_bit_exactly():
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(-2**31, 2**31 - 1, (7,), dtype=np.int32),
        np.array([0.1, -np.inf, np.nan, 3.0e38, -0.0], np.float32),
        rng.integers(0, 2**32 - 1, (3, 2), dtype=np.uint32),
        np.array([[True, False, True], [False, False, True]]),
        np.zeros((0, 4), np.int32),
        np.asfortranarray(rng.random((3, 4)).astype(np.float32)),  # not C-contiguous
    ]
    buf, layout = pack(arrays)
    assert buf.dtype == np.int32 and buf.ndim == 1
    out = jax.jit(unpack, static_argnums=1)(buf, layout)
    for a, b in zip(arrays, out):
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        assert b.dtype == a.dtype and b.shape == a.shape
        assert a.tobytes() == b.tobytes()  # bit-exact: NaN, -0.0 and inf included


def test_core_outputs_split_by_owner():
    out = CoreOutputs(
        req_ids=["a", "b-0", "b-1", "c"], token_ids=[1, 2, 3, 4],
        finished={"b-1": (4, None), "c": (3, 7)}, logprobs={"a": (-0.5, [1], [-0.5])},
        prompt_logprobs=[("b-0", 1, {5: Logprob(-1.0)})], scheduled={"c": (1.0, 16)}, done=["c"],
    )
    owner = {"a": 0, "b": 1, "b-0": 1, "b-1": 1}  # "c" has no owner (its client left)
    parts = out.split(owner)
    assert set(parts) == {0, 1}
    assert parts[0].req_ids == ["a"] and parts[0].token_ids == [1] and parts[0].logprobs == out.logprobs
    assert not parts[0].finished and not parts[0].done
    p1 = parts[1]
    assert p1.req_ids == ["b-0", "b-1"] and p1.token_ids == [2, 3] and p1.finished == {"b-1": (4, None)}
    assert p1.prompt_logprobs == out.prompt_logprobs and not p1.scheduled and not p1.done
    merged = CoreOutputs()
    for p in parts.values():
        merged.extend(p)
    assert sorted(merged.req_ids) == ["a", "b-0", "b-1"] and bool(merged) and not CoreOutputs()
