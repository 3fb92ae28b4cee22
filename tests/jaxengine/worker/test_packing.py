"""One packed int32 buffer per jitted call (jaxengine.worker.packing)."""

from __future__ import annotations

import jax
import numpy as np

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
