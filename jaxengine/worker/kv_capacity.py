"""KV-cache capacity: the cache's storage dtype, bytes per token from a model's shape, and
blocks from a memory budget."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

_DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int8": 1,
}


def dtype_num_bytes(dtype: Any) -> int:
    """Bytes per element for a dtype name, numpy/jax dtype, or an int (taken as bytes)."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype < 1:
            raise ValueError(f"dtype bytes must be >= 1, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        import numpy as np  # numpy / jax dtypes and scalar types (jnp.bfloat16 via ml_dtypes)

        try:
            return int(np.dtype(dtype).itemsize)
        except TypeError:
            pass  # e.g. a torch dtype: fall through to its name
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def kv_storage_dtype(dtype: Any) -> jnp.dtype:
    """The KV cache's dtype for a model computing in `dtype`. On XLA:CPU a 16-bit cache is
    kept in float32: XLA:CPU upcasts a bf16/f16 gather or scatter by converting its whole
    operand, i.e. the whole cache of every layer on every step (8.6x slower steps on the dev
    VM for a bf16 tiny Llama). float32 holds the same 16-bit values exactly, so the outputs
    are unchanged; the fixed CPU byte budget then holds half the tokens."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize < 4 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


def _get(config: Any, *names: str) -> Any:
    for n in names:
        v = config.get(n) if isinstance(config, dict) else getattr(config, n, None)
        if v is not None:
            return v
    return None


def kv_bytes_per_token(
    config: Any = None,
    *,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype: Any = "bfloat16",
) -> int:
    """K and V bytes one token occupies across all layers: 2 * L * Hkv * D * dtype bytes.

    `config` may be an HF-style config (object or dict: num_hidden_layers,
    num_key_value_heads (falls back to num_attention_heads), head_dim (falls back to
    hidden_size // num_attention_heads)); keyword arguments override it.
    """
    if config is not None:
        num_layers = num_layers or _get(config, "num_layers", "num_hidden_layers")
        num_heads = _get(config, "num_attention_heads", "num_heads")
        num_kv_heads = num_kv_heads or _get(config, "num_kv_heads", "num_key_value_heads") or num_heads
        if head_dim is None:
            head_dim = _get(config, "head_dim")
            hidden = _get(config, "hidden_size")
            if head_dim is None and hidden and num_heads:
                head_dim = hidden // num_heads
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_num_bytes(dtype)


def num_blocks_for_budget(memory_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many blocks (null block included) fit in `memory_bytes` of KV cache."""
    if block_size < 1 or bytes_per_token < 1:
        raise ValueError(
            f"block_size and bytes_per_token must be >= 1, got {block_size}, {bytes_per_token}"
        )
    num_blocks = int(memory_bytes) // (block_size * bytes_per_token)
    if num_blocks < 2:
        raise ValueError(
            f"a KV budget of {memory_bytes} bytes holds {num_blocks} blocks of {block_size} tokens "
            f"x {bytes_per_token} bytes; need at least 2 (block 0 is reserved): give more memory"
        )
    return num_blocks


_claimed_fraction: float | None = None  # what claim_device_memory set, if it did
# The allocator's fraction of the device, as jaxlib reads it: its current name, then the
# deprecated one (setting both is an error).
_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def _fraction_from_env() -> str | None:
    return next((os.environ[v] for v in _FRACTION_VARS if os.environ.get(v)), None)


def claim_device_memory(fraction: float) -> None:
    """Make `fraction` of each accelerator's memory the limit of JAX's allocator, as vLLM's
    gpu_memory_utilization is a fraction of the device (JAX's own default limit is 75%).
    This only works before JAX creates its backends and when the user has not set
    XLA_CLIENT_MEM_FRACTION (or XLA_PYTHON_CLIENT_MEM_FRACTION); otherwise the limit stays
    and `memory_budget` takes the fraction of it."""
    global _claimed_fraction
    # JAX has no public way to ask whether its backends exist yet; without knowing, a
    # fraction asked after they started would be taken of the wrong limit.
    from jax._src import xla_bridge

    if _claimed_fraction is None and _fraction_from_env() is None and not xla_bridge.backends_are_initialized():
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = repr(fraction)
        _claimed_fraction = fraction


def device_memory_bytes(device) -> int | None:
    """The device's memory in bytes: the allocator's limit over the fraction of the device it
    was given (XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_MEM_FRACTION, JAX's default 0.75).
    None where the device keeps no memory statistics (CPU)."""
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is None:
        return None
    return int(limit / float(_fraction_from_env() or "0.75"))


# Of the allocator's limit, kept out of the KV cache for what the profiled activation peak
# does not count (it takes one step's largest program): a second step in flight, programs
# compiled on first use, and allocator fragmentation. An H200 running the 1B
# preset ran out of memory in its first step with none kept.
HEADROOM_FRACTION = 0.04


def memory_budget(bytes_limit: int, bytes_in_use: int, activation_peak: int, fraction: float) -> int:
    """Bytes left for the KV cache: the allocator's limit (already `fraction` of the device
    when claim_device_memory set it, else scaled by `fraction`) minus what is resident
    (weights), the largest step's activations and HEADROOM_FRACTION of the limit."""
    limit = bytes_limit if _claimed_fraction == fraction else bytes_limit * fraction
    return int(limit * (1 - HEADROOM_FRACTION) - bytes_in_use - activation_peak)
