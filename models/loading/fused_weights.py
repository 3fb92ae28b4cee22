"""Parameters that stack several Hugging Face tensors, and the way between the two.

The model keeps q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj`, so each is one
matmul over one weight. Left as separate weights, XLA merged them itself into one Triton GEMM
that concatenates the weights on the fly, and that GEMM was slow: on an H200 (8B, decode
steps of 256 tokens) q/k/v took 52.6 us a layer (245 TFLOP/s) and, at TP 2, gate/up 75.7 us
where TP 1's two cuBLAS GEMMs over twice the columns took 45 us each. Fused here, a decode
step went from 10.62 to 10.14 ms at TP 1 and from 8.42 to 7.13 ms at TP 2.

Layout: [lead, parts, *inner]. The lead axis is the one tensor parallelism splits and axis 1
holds the parts side by side, so a shard of the lead axis holds whole groups:

    qkv_proj.weight      [Hkv, G + 2, D, hidden]   per KV head: its G query heads, then k, then v
    qkv_proj.bias        [Hkv, G + 2, D]
    gate_up_proj.weight  [I, 2, hidden]            per intermediate row: gate, then up
    gate_up_proj.bias    [I, 2]

The first source fills all slots of axis 1 but one per other source (G for q; 1 for gate).
Each source tensor is the fused array's part reshaped back: q_proj.weight [Hq * D, hidden]
is qkv[:, :G] ([Hkv, G, D, hidden]) in row-major order, since query head h uses KV head h // G.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def _split(name: str) -> tuple[str, str, str] | None:
    """"a.b.qkv_proj.weight" -> ("a.b.", "qkv_proj", ".weight"); None for an unfused name."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in FUSED:
        return None
    return ".".join(parts[:-2]) + ("." if len(parts) > 2 else ""), parts[-2], "." + parts[-1]


def is_fused(name: str) -> bool:
    return _split(name) is not None


def source_names(name: str) -> list[str]:
    """The checkpoint names behind a parameter name, in stacking order (itself when unfused)."""
    split = _split(name)
    if split is None:
        return [name]
    prefix, module, suffix = split
    return [prefix + source + suffix for source in FUSED[module]]


def _parts(fused_shape: tuple[int, ...], n_sources: int) -> list[int]:
    return [fused_shape[1] - (n_sources - 1)] + [1] * (n_sources - 1)


def source_shapes(name: str, fused_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors behind a parameter and their shapes ({name: shape} for an unfused one)."""
    split = _split(name)
    if split is None:
        return {name: fused_shape}
    prefix, module, suffix = split
    lead, inner = fused_shape[0], fused_shape[2:]
    shapes = {}
    for source, p in zip(FUSED[module], _parts(fused_shape, len(FUSED[module]))):
        # A weight stays [out, in]; a bias is flat.
        keep = inner[-1:] if suffix == ".weight" else ()
        shapes[prefix + source + suffix] = (lead * p * int(np.prod(inner[: len(inner) - len(keep)])), *keep)
    return shapes


def read(name: str, fused_shape: tuple[int, ...], tensor: Callable[[str], np.ndarray],
         index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The parameter (or its `index` block) assembled from the checkpoint tensors that
    `tensor(name)` returns (memory-mapped views: only the rows of the block are read)."""
    index = index or (slice(None),) * len(fused_shape)
    if not is_fused(name):
        return np.asarray(tensor(name)[index])
    sources = source_shapes(name, fused_shape)
    lead, inner = fused_shape[0], fused_shape[2:]
    pieces = [tensor(source).reshape(lead, p, *inner)[index[0]]
              for source, p in zip(sources, _parts(fused_shape, len(sources)))]
    return np.concatenate(pieces, axis=1)[(slice(None), *index[1:])]


def unfuse(name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """A parameter as its checkpoint tensors ({name: array} for an unfused one)."""
    if not is_fused(name):
        return {name: array}
    shapes = source_shapes(name, array.shape)
    bounds = np.cumsum(_parts(array.shape, len(shapes)))[:-1]
    return {source: part.reshape(shape) for (source, shape), part in zip(shapes.items(), np.split(array, bounds, axis=1))}
