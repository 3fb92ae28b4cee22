"""A step's host arrays as ONE int32 buffer: one host-to-device copy instead of one per array.

A jitted call copies every numpy argument to the device separately, and each copy costs the
host ~20 us: a step's ~20 small metadata and sampling arrays cost more host time than the
whole dispatch of the model (measured on an H200). `pack` lays them end to end as
int32 (float32 / uint32 as their raw bits, bools as 0/1); `unpack`, inside the jitted
function, slices them back out at offsets fixed by the static `Layout`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per array: (shape, dtype name), in packing order. Hashable: a static jit argument.
Layout = tuple[tuple[tuple[int, ...], str], ...]


def pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, Layout]:
    """[N] int32 holding every array (32-bit or bool), and how to take them apart."""
    layout = tuple((a.shape, a.dtype.name) for a in arrays)
    assert all(a.dtype == np.bool_ or a.dtype.itemsize == 4 for a in arrays), [a.dtype for a in arrays]
    parts = [(a.astype(np.int32) if a.dtype == np.bool_ else np.ascontiguousarray(a).view(np.int32)).ravel()
             for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), layout


def unpack(buf: jax.Array, layout: Layout) -> list[jax.Array]:
    """`pack`'s arrays, from its buffer on the device ([N] int32)."""
    out, offset = [], 0
    for shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        flat = buf[offset : offset + size]
        offset += size
        if dtype == "bool":
            flat = flat != 0
        elif dtype != "int32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
        out.append(flat.reshape(shape))
    return out
