"""How many KV blocks an engine allocates: from the device's free memory after the weights
and the largest step's activations (GPU), or from a fixed byte budget where the device
reports no memory statistics (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxengine.worker.kv_capacity import kv_bytes_per_token, memory_budget, num_blocks_for_budget
from models.sharding import TP


class KVCacheSize(NamedTuple):
    num_blocks: int
    # The largest step's activations, measured from its compiled program (None: not
    # measured, with a fixed budget or a given block count).
    activation_peak_bytes: int | None


def size_kv_cache(
    *, model_config: Any, kv_dtype: Any, block_size: int, mesh: jax.sharding.Mesh | None,
    profile_peak_bytes: Callable[[], int], gpu_memory_utilization: float, kv_cache_bytes: int,
    num_kv_blocks: int | None = None,
) -> KVCacheSize:
    """`num_kv_blocks` when given; else the blocks that fit. With several processes, every
    process allocates process 0's count (they must hold the same cache)."""
    peak = None
    if num_kv_blocks is not None:
        num_blocks = num_kv_blocks
    else:
        # Per device: with tensor parallelism each device holds num_kv_heads / tp heads of
        # every block, so the budget is one device's.
        tp = 1 if mesh is None else mesh.shape[TP]
        per_token = kv_bytes_per_token(
            num_layers=model_config.num_layers, num_kv_heads=model_config.num_kv_heads // tp,
            head_dim=model_config.head_dim, dtype=kv_dtype,
        )
        device = jax.local_devices()[0] if mesh is None else mesh.local_devices[0]
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            # The weights are resident already; the largest step's activations come off too.
            peak = profile_peak_bytes()
            budget = memory_budget(stats["bytes_limit"], stats.get("bytes_in_use", 0), peak, gpu_memory_utilization)
        else:
            budget = kv_cache_bytes
        num_blocks = num_blocks_for_budget(int(budget), block_size, per_token)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        num_blocks = int(multihost_utils.broadcast_one_to_all(np.int32(num_blocks)))
    return KVCacheSize(num_blocks, peak)
