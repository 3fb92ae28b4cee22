"""Sharding: the device mesh, the one logical-axis rules table, and where every parameter
and KV-cache axis lives on the mesh.

Mesh. Two named axes, `dp` (data-parallel replicas) and `tp` (tensor parallelism):
`make_mesh(tensor_parallel_size, data_parallel_size)` lays the first dp * tp devices out as
a [dp, tp] grid. A data-parallel replica is one row of it (`replica_meshes`): an independent
engine (own scheduler, own KV pool) whose program runs over that row's `tp` devices only.

Logical axes. Parameters and the KV cache name their dimensions logically ("heads",
"kv_heads", "mlp", "vocab", "embed", ...). `RULES` maps each logical name to a mesh axis
(or None: replicated), and `logical_to_physical` turns a tuple of logical names into a
`PartitionSpec`, refusing a spec that uses one mesh axis twice. This table is the only place
that decides what is split: Megatron-style, attention heads, KV heads, the MLP intermediate
and the vocabulary are split over `tp`; the hidden ("embed") dimension is replicated. XLA
(GSPMD) inserts the collectives: an all-reduce after o_proj and down_proj (their contracting
dimension is split) and around the vocab-split embedding and logits; nothing is hand-written.

Attention runs per shard: `shard_heads` wraps the KV write and the attention kernel
(Pallas or the jnp reference) in `shard_map` over `tp`, with q split on heads, the cache on
KV heads and the batch metadata replicated, so each device runs the unmodified kernel on its
Hq/tp query heads and Hkv/tp KV heads (contiguous head blocks keep the GQA groups together).

Multi-host. JAX's own multi-controller runtime, nothing home-made: every process calls
`initialize_distributed(coordinator_address, num_processes, process_id)` (a thin wrapper of
`jax.distributed.initialize`) before any other JAX call, after which `jax.devices()` lists
the devices of all processes and `make_mesh` builds the same global mesh in each of them
(devices are ordered by process, so a `tp` row never straddles hosts unless tp exceeds one
host's device count). Every process then runs the same jitted step on the same host inputs
(SPMD); `load_model(..., mesh=mesh)` makes each process read only the slices of its own
devices (`jax.make_array_from_callback` calls back for addressable devices only). Example,
2 hosts x 8 GPUs, TP 16:

    # on every host, with its own process_id (0 or 1):
    from models.sharding import initialize_distributed, make_mesh
    initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=PID)
    llm = jaxengine.LLM(model_dir, tensor_parallel_size=16)

The step inputs come from the host loop (scheduler, block tables, sampling rows), which must
therefore produce identical inputs on every process: either run the same deterministic loop
everywhere (what `LLM.generate` does when every process submits the same requests), or run
the loop on process 0 and broadcast each step's host arrays (the serving path's job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig

DP, TP = "dp", "tp"
MESH_AXES = (DP, TP)

MeshAxes = str | tuple[str, ...] | None

# THE rules table: logical axis -> mesh axis (or axes), None = replicated.
RULES: dict[str, MeshAxes] = {
    "batch": DP,  # sequences of one SPMD batch; a DP replica's mesh has dp = 1, so a no-op there
    "tokens": None,  # the flat ragged batch [T]
    # The residual stream's tokens under sequence parallelism (prefill-sized steps only,
    # EngineConfig.sequence_parallel_min_tokens): split, so norms and residual adds run on
    # T / tp rows and each all-reduce becomes a reduce-scatter + all-gather.
    "sequence": TP,
    "embed": None,  # hidden size
    "vocab": TP,
    "heads": TP,  # query heads (q_proj rows, o_proj columns: heads x head_dim folded)
    "kv_heads": TP,  # key/value heads (k/v_proj rows, the KV cache's head axis)
    "head_dim": None,
    "mlp": TP,  # intermediate size (dense MLPs, each routed expert, the shared expert)
    "experts": None,  # the expert axis of MoE weights and the router's output (expert parallel would split it)
    "gate_out": None,  # the shared expert gate's single output
    "fused": None,  # the parts of a fused projection, side by side (models.loading.fused_weights)
    "layers": None,
    "kv": None,  # the cache's K-or-V axis
    "pages": None,
    "page": None,  # tokens within a page
}

# Logical axes of each parameter, by the last two parts of its Hugging Face name.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens.weight": ("vocab", "embed"),
    "lm_head.weight": ("vocab", "embed"),
    # q/k/v stacked per KV head (models.loading.fused_weights): a shard of KV heads holds whole GQA groups.
    "qkv_proj.weight": ("kv_heads", "fused", "head_dim", "embed"),
    "qkv_proj.bias": ("kv_heads", "fused", "head_dim"),
    "o_proj.weight": ("embed", "heads"),
    "o_proj.bias": ("embed",),
    "q_norm.weight": ("head_dim",),
    "k_norm.weight": ("head_dim",),
    "gate_up_proj.weight": ("mlp", "fused", "embed"),
    "gate_up_proj.bias": ("mlp", "fused"),
    "down_proj.weight": ("embed", "mlp"),
    "down_proj.bias": ("embed",),
    # MoE (models.moe): stacked experts, each split like the dense MLP; router and gate replicated.
    "experts.gate_up_proj": ("experts", "mlp", "fused", "embed"),
    "experts.down_proj": ("experts", "embed", "mlp"),
    "gate.weight": ("experts", "embed"),
    "shared_expert_gate.weight": ("gate_out", "embed"),
    "input_layernorm.weight": ("embed",),
    "post_attention_layernorm.weight": ("embed",),
    "norm.weight": ("embed",),
}

KV_CACHE_AXES = ("kv", "kv_heads", "pages", "page", "head_dim")  # pallas_kernels.kv_cache layout
EXPERT_ROWS_AXES = ("tokens", "embed")  # [T * k, H]: the rows sorted by expert
Q_AXES = ("tokens", "heads", "head_dim")  # [T, Hq, D]
RESIDUAL_AXES = ("sequence", "embed")  # [T, hidden] under sequence parallelism
KV_NEW_AXES = ("tokens", "kv_heads", "head_dim")  # [T, Hkv, D]


# ----------------------------------------------------------------------------- mesh


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A [dp, tp] mesh over the first dp * tp devices (default: `jax.devices()`, all processes)."""
    for name, n in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ValueError(
            f"tensor_parallel_size ({tensor_parallel_size}) x data_parallel_size ({data_parallel_size}) = {need} "
            f"devices, but only {len(devices)} are available ({devices[0].platform})"
        )
    grid = np.array(devices[:need], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One [1, tp] mesh per data-parallel replica (the rows of `mesh`), disjoint devices."""
    return [Mesh(mesh.devices[i : i + 1], MESH_AXES) for i in range(mesh.shape[DP])]


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kwargs: Any) -> None:
    """Multi-host: join JAX's distributed runtime (call first in every process; see the module
    docstring). Extra keyword arguments (e.g. `local_device_ids`) go to `jax.distributed.initialize`."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )


# ----------------------------------------------------------------------------- rules


def _mesh_axes(value: MeshAxes) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def logical_to_physical(logical_axes: Sequence[str | None], rules: dict[str, MeshAxes] = RULES) -> P:
    """Logical axis names -> PartitionSpec through `rules`; a mesh axis used twice is an error."""
    spec, used = [], {}
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {', '.join(rules)}")
        value = rules[name]
        for axis in _mesh_axes(value):
            if axis in used:
                raise ValueError(
                    f"mesh axis {axis!r} is used twice in logical axes {tuple(logical_axes)}: by "
                    f"{logical_axes[used[axis]]!r} (dim {used[axis]}) and {name!r} (dim {dim})"
                )
            used[axis] = dim
        spec.append(value)
    return P(*spec)


def param_logical_axes(name: str) -> tuple[str, ...]:
    key = ".".join(name.split(".")[-2:])
    module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    # A quantized linear's scales (models.quantization.quantized_linear): weight_scale [*out]
    # has the weight's axes less the contracting one, so it is split with the output rows;
    # the static input_scale [] is one number, replicated.
    if leaf == "weight_scale" and f"{module}.weight" in PARAM_AXES:
        return PARAM_AXES[f"{module}.weight"][:-1]
    if leaf == "input_scale" and f"{module}.weight" in PARAM_AXES:
        return ()
    if key not in PARAM_AXES:
        raise KeyError(f"no logical axes for parameter {name!r} (add {key!r} to models.sharding.PARAM_AXES)")
    return PARAM_AXES[key]


def _axis_size(mesh: Mesh, value: MeshAxes) -> int:
    return int(np.prod([mesh.shape[a] for a in _mesh_axes(value)], dtype=np.int64))


def check_divisible(cfg: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> None:
    """A clear error when a dimension the rules split does not divide by its mesh axes."""
    dims = [("heads", "num_attention_heads", cfg.num_heads), ("kv_heads", "num_key_value_heads", cfg.num_kv_heads),
            ("mlp", "intermediate_size", cfg.intermediate_size), ("vocab", "vocab_size", cfg.vocab_size),
            ("embed", "hidden_size", cfg.hidden_size), ("head_dim", "head_dim", cfg.head_dim)]
    if cfg.moe is not None:
        dims += [("mlp", "moe_intermediate_size", cfg.moe.intermediate_size), ("experts", "num_experts", cfg.moe.num_experts)]
        if cfg.moe.shared_expert_intermediate_size:
            dims.append(("mlp", "shared_expert_intermediate_size", cfg.moe.shared_expert_intermediate_size))
    problems = []
    for logical, field, n in dims:
        axes = _mesh_axes(rules.get(logical))
        size = _axis_size(mesh, rules.get(logical))
        if size > 1 and n % size:
            by = "tensor_parallel_size" if axes == (TP,) else " x ".join(f"mesh axis {a!r}" for a in axes)
            problems.append(f"{field} ({n}) is not divisible by {by} ({size})")
    if problems:
        raise ValueError("cannot shard the model over the mesh: " + "; ".join(problems))


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh | None = None, rules: dict[str, MeshAxes] = RULES) -> P:
    axes = param_logical_axes(name)
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r} has shape {shape}, but {len(axes)} logical axes {axes}")
    spec = logical_to_physical(axes, rules)
    if mesh is not None:
        for dim, (n, value) in enumerate(zip(shape, spec)):
            if n % _axis_size(mesh, value):
                raise ValueError(f"parameter {name!r} dim {dim} ({axes[dim]}, {n}) is not divisible by mesh axes {value}")
    return spec


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> NamedSharding:
    return NamedSharding(mesh, param_spec(name, shape, mesh, rules))


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> Any:
    """An nnx.State of NamedShardings shaped like `state` (arrays or ShapeDtypeStructs)."""
    from flax import nnx

    flat = nnx.to_flat_state(state)
    out = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        out.append((path, var.replace(param_sharding(name, tuple(var.get_value().shape), mesh, rules))))
    return nnx.from_flat_state(out)


def kv_cache_sharding(mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_physical(KV_CACHE_AXES, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sequence_split(mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> Callable[[jax.Array], jax.Array]:
    """Sequence parallelism: a function that keeps a [T, hidden] activation split by token.
    XLA then reduce-scatters each row-parallel matmul's partial sums into it and all-gathers
    it before each column-parallel matmul, instead of all-reducing."""
    sharding = NamedSharding(mesh, logical_to_physical(RESIDUAL_AXES, rules))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


# ----------------------------------------------------------------------------- per-shard kernels


def shard_heads(fn: Callable, mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> Callable:
    """Run `fn(q, k, v, kv_cache, meta) -> (out, kv_cache)` per `tp` shard: q/out split on
    heads, the new k/v and the cache on KV heads, the metadata replicated. The body sees
    Hq/tp and Hkv/tp heads and needs no collective (heads are independent)."""
    q, kv_new, cache = (logical_to_physical(a, rules) for a in (Q_AXES, KV_NEW_AXES, KV_CACHE_AXES))
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(q, kv_new, kv_new, cache, P()), out_specs=(q, cache),
        # Pallas calls do not carry varying-manual-axes types; the specs above say it all.
        check_vma=False,
    )


def shard_experts(fn: Callable, mesh: Mesh, rules: dict[str, MeshAxes] = RULES) -> Callable:
    """Run `fn(rows, group_sizes, gate_up, down) -> out` (models.moe.experts) per shard of the
    expert weights' "mlp" axis: each device computes its slice of every expert's intermediate
    and the partial [M, H] outputs are summed over those mesh axes (the row-parallel down_proj's
    all-reduce). Written out, not left to XLA's partitioner: it happens to keep the jnp loop
    split, but a Pallas kernel behind `grouped_matmul` is a custom call it cannot split."""
    gate_up, down = (logical_to_physical(PARAM_AXES[k], rules) for k in ("experts.gate_up_proj", "experts.down_proj"))
    rows = logical_to_physical(EXPERT_ROWS_AXES, rules)
    summed = _mesh_axes(rules["mlp"])

    def body(*args):
        out = fn(*args)
        return jax.lax.psum(out, summed) if summed else out

    return jax.shard_map(body, mesh=mesh, in_specs=(rows, P(), gate_up, down), out_specs=rows, check_vma=False)
