"""MoE checkpoint tensors <-> the model's stacked expert parameters.

The model holds each layer's experts as two stacked parameters (models.moe.experts):
`mlp.experts.gate_up_proj` [E, I, 2, H] and `mlp.experts.down_proj` [E, H, I]. Checkpoints
come in three layouts, told apart by which tensors the files hold:

    fused       transformers 5 in memory      mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows),
                                              mlp.experts.down_proj [E, H, I]
    per-expert  what save_pretrained writes   mlp.experts.{e}.gate_proj / up_proj / down_proj.weight
                (Qwen2/3-MoE, and the Hub)
    mixtral     Mixtral's Hub and saved names block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down).weight,
                                              block_sparse_moe.gate.weight (the router, our mlp.gate.weight)

A tensor-parallel block (index) reads only its rows from the memory-mapped files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Has = Callable[[str], bool]
Tensor = Callable[[str], np.ndarray]
Index = tuple[slice, ...]

_PARAMS = (".experts.gate_up_proj", ".experts.down_proj")
_ROUTER = ".mlp.gate.weight"


class Layout(NamedTuple):
    """Where one MoE block's expert tensors are: `block` is the checkpoint's module prefix
    ("model.layers.3.mlp" or "...block_sparse_moe"); names are (gate, up, down) per expert,
    empty for the fused layout."""

    block: str
    per_expert: tuple[str, str, str]


def handles(name: str) -> bool:
    return name.endswith(_PARAMS) or name.endswith(_ROUTER)


def _mixtral(block: str) -> str:
    return block[: -len(".mlp")] + ".block_sparse_moe"


def layout(block: str, has: Has) -> Layout:
    """`block`: the model's prefix of the MoE block ("model.layers.3.mlp")."""
    if has(f"{block}.experts.gate_up_proj"):
        return Layout(block, ())
    if has(f"{_mixtral(block)}.experts.0.w1.weight"):
        return Layout(_mixtral(block), ("w1", "w3", "w2"))
    return Layout(block, ("gate_proj", "up_proj", "down_proj"))


def _split(name: str) -> tuple[str, str]:
    """"model.layers.3.mlp.experts.down_proj" -> ("model.layers.3.mlp", "down_proj")."""
    head, param = name.rsplit(".", 1)
    return head[: -len(".experts")], param


def source_shapes(name: str, shape: tuple[int, ...], has: Has) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors behind parameter `name` and the shapes they must have."""
    if name.endswith(_ROUTER):
        mixtral = _mixtral(name[: -len(".gate.weight")]) + ".gate.weight"
        return {mixtral if not has(name) and has(mixtral) else name: shape}
    block, param = _split(name)
    lay = layout(block, has)
    if not lay.per_expert:
        e = shape[0]
        return {f"{block}.experts.{param}": (e, shape[1] * 2, shape[3]) if param == "gate_up_proj" else shape}
    gate, up, down = lay.per_expert
    names = (gate, up) if param == "gate_up_proj" else (down,)
    inner = (shape[1], shape[3]) if param == "gate_up_proj" else shape[1:]
    return {f"{lay.block}.experts.{e}.{n}.weight": inner for e in range(shape[0]) for n in names}


def read(name: str, shape: tuple[int, ...], has: Has, tensor: Tensor, index: Index | None = None) -> np.ndarray:
    """Parameter `name` (or its `index` block) from the checkpoint tensors `tensor(name)` returns."""
    index = index or (slice(None),) * len(shape)
    if name.endswith(_ROUTER):
        (source,) = source_shapes(name, shape, has)
        return np.asarray(tensor(source)[index])
    block, param = _split(name)
    lay = layout(block, has)
    experts = range(shape[0])[index[0]]
    if param == "down_proj":  # [E, H, I]
        if not lay.per_expert:
            return np.asarray(tensor(f"{block}.experts.down_proj")[index])
        return np.stack([tensor(f"{lay.block}.experts.{e}.{lay.per_expert[2]}.weight")[index[1:]] for e in experts])
    e_sl, i_sl, p_sl, h_sl = index  # gate_up_proj [E, I, 2, H]
    if not lay.per_expert:
        fused = tensor(f"{block}.experts.gate_up_proj").reshape(shape[0], 2, shape[1], shape[3])
        return np.ascontiguousarray(fused[e_sl, p_sl, i_sl, h_sl].transpose(0, 2, 1, 3))
    parts = lay.per_expert[:2][p_sl]
    return np.stack([
        np.stack([tensor(f"{lay.block}.experts.{e}.{part}.weight")[i_sl, h_sl] for part in parts], axis=1)
        for e in experts
    ])
