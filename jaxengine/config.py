"""EngineConfig: the engine arguments a user sets (vLLM's names and, where sensible, defaults)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from jaxengine.structured_output.backends import BACKENDS as STRUCTURED_OUTPUTS_BACKENDS

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_PREFILL_ATTENTION_BODIES = ("auto", "mosaic", "triton")  # pallas_kernels' PREFILL_BODIES
# models.quantization.scheme.QUANTIZATION_METHODS (tests/jaxengine/test_config.py checks they
# agree; spelled out here so that making a config imports no model code).
QUANTIZATION_METHODS = ("fp8", "int8")
KV_CACHE_DTYPES = ("auto", "fp8")


def default_model_dir() -> Path:
    """The small code model shipped inside the package (see jaxengine/default_model/README.md)."""
    return Path(__file__).resolve().parent / "default_model"


def batch_defaults(platform: str, device_kind: str, memory_bytes: int | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when the user sets neither. On GPUs, vLLM's rule:
    1024 sequences on one of >= 70 GiB that is not an A100 (H100, H200: the larger decode
    batch is what lets 8B TP 2 reach 1.6x TP 1 on an H200 pair), else 256.
    8192 batched tokens, vLLM's server value (its offline LLM takes 16384, which measured within
    1% on an H200 pair and doubles the longest step a stream waits behind). On CPU 16 / 256:
    every compiled bucket costs seconds at start-up and large batches buy nothing."""
    if platform == "cpu":
        return 16, 256
    large = memory_bytes is not None and memory_bytes >= 70 << 30 and "a100" not in device_kind.lower()
    return (1024 if large else 256), 8192


@dataclasses.dataclass
class EngineConfig:
    model: str = ""  # checkpoint dir, or a preset name (random weights) from models.PRESETS
    tokenizer: str | None = None  # default: the model dir
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype (bf16 for presets)
    # vLLM's: "fp8" (decoder linears in float8_e4m3fn with per-channel scales, activations
    # quantized per token: W8A8) or "int8" (weight-only, per channel); None: the checkpoint's
    # own (a pre-quantized FP8 checkpoint runs as FP8), else unquantized. Embeddings, norms and
    # lm_head stay in `dtype`. See models.quantization.
    quantization: str | None = None
    # "auto": the KV cache in the model's dtype. "fp8" is accepted here but not implemented
    # yet (the engine refuses it at construction).
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    # Where the device has no memory statistics (CPU): a fixed KV-cache budget.
    kv_cache_bytes: int = 256 << 20
    num_kv_blocks: int | None = None  # override the sizing (tests, benchmarks)
    # None: batch_defaults() for the device (vLLM's: 1024 / 8192 on a GPU of >= 70 GiB).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    seed: int = 0
    # Most samples one request may ask for (SamplingParams.n), vLLM's name and default: one
    # request's n samples run as n sequences, so an unbounded n could take every seat.
    max_n: int = 128
    # Several devices (models.sharding): tensor_parallel_size devices per model replica, and
    # data_parallel_size independent replicas (own scheduler and KV pool each) on disjoint
    # device groups, requests spread round-robin (jaxengine.engine.data_parallel).
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Several processes (jax.distributed): True runs the scheduler on process 0 only, which
    # broadcasts each step to the others (they call Engine.follow()); False runs the same
    # deterministic host loop on every process (all must then get the same requests).
    host_loop_on_process_zero: bool = False
    # Schedule step N+1 while step N runs on the device (vLLM V1's async scheduling).
    async_scheduling: bool = True
    # Decode steps per dispatch (vLLM V0's num_scheduler_steps): when every running request
    # is decoding, no waiting request could be admitted (none waits, or max_num_seqs run) and
    # no request needs per-step sampling work (penalties, logit bias, min_tokens, logprobs),
    # one program runs this many forward + sample steps,
    # each step's tokens feeding the next. It pays the host's per-step cost (schedule,
    # prepare, dispatch, update) once per that many tokens. Stops are applied afterwards: a
    # request that ends inside the run drops its later tokens. 1 = off.
    num_scheduler_steps: int = 1
    # Tensor parallel only: steps of at least this many tokens (the T bucket; prefill-sized)
    # keep the residual stream split over `tp` by token between the layers (sequence
    # parallelism): norms and residual adds run on T / tp rows, each all-reduce becomes a
    # reduce-scatter + all-gather, and XLA may overlap those with the neighbouring matmuls
    # (its windowed einsum, switched on for these programs). On an H200 pair the all-reduces
    # were 14.5 ms of a 100 ms 8B prefill step at TP 2. None: off, because on that H200 pair
    # it made the prefill steps slower (116 -> 135 ms).
    sequence_parallel_min_tokens: int | None = None
    # Streams (AsyncEngine, EngineProcess, the gRPC service): a request's next message waits
    # for this many new tokens (its first tokens and its end go at once), as vLLM's
    # stream_interval. 1 sends every step; larger values trade smoothness for fewer messages,
    # which is what limits a busy server.
    stream_interval: int = 1
    # Start-up compiles every bucket's program (ModelRunner.warmup); this many compile at once
    # (XLA's compile releases the GIL). None: min(4, CPU count). On H200s 4 threads took the
    # 8B TP 2 start-up from 213 s to 144 s with 15 more programs; 8 threads ran out of device
    # memory outside JAX's allocator while autotuning.
    compile_threads: int | None = None
    # The grammar library of structured outputs (vLLM's --structured-outputs-backend):
    # "xgrammar" or "llguidance".
    structured_outputs_backend: str = "xgrammar"
    # Constrained JSON without free whitespace for every request (each may also ask, with
    # StructuredOutputsParams.disable_any_whitespace), as vLLM's structured_outputs_config option.
    structured_outputs_disable_any_whitespace: bool = False
    use_pallas: bool | None = None  # None: the Pallas kernel on GPU, the jnp reference elsewhere
    # The Pallas kernel's body for prefill chunks (pallas_kernels.ragged_paged_attention's
    # prefill_body): "mosaic" (Mosaic GPU, Hopper only), "triton" (every token on the Triton
    # body), "auto" (Mosaic GPU where the device and shapes allow it, else Triton).
    prefill_attention_body: str = "auto"
    # XLA's persistent compilation cache: the second start-up skips compilation. "" disables.
    # JAX's own JAX_COMPILATION_CACHE_DIR, when set, is the default.
    compilation_cache_dir: str = dataclasses.field(default_factory=lambda: os.environ.get(
        "JAX_COMPILATION_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxengine", "xla"))

    def __post_init__(self) -> None:
        if not self.model:
            self.model = str(default_model_dir())
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.prefill_attention_body not in _PREFILL_ATTENTION_BODIES:
            raise ValueError(f"prefill_attention_body must be one of {', '.join(_PREFILL_ATTENTION_BODIES)}, "
                             f"got {self.prefill_attention_body!r}")
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, got "
                             f"{self.structured_outputs_backend!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "data_parallel_size",
                     "stream_interval", "num_scheduler_steps", "compile_threads", "sequence_parallel_min_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not isinstance(self.max_n, int) or isinstance(self.max_n, bool) or self.max_n < 1:
            raise ValueError(f"max_n must be an integer >= 1, got {self.max_n!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.compile_threads is None:
            self.compile_threads = min(4, os.cpu_count() or 1)

    def resolve_platform_defaults(self) -> None:
        """Fill the defaults that depend on the device. This initialises JAX's backends, so it
        runs where the engine is built, not where a config is made: a server whose engine runs
        in another process (EngineProcess) must not claim the GPU's memory."""
        if self.max_num_seqs is None or self.max_num_batched_tokens is None:
            import jax

            from jaxengine.worker.kv_capacity import device_memory_bytes

            device = jax.local_devices()[0]
            seqs, tokens = batch_defaults(device.platform, device.device_kind, device_memory_bytes(device))
            if self.max_num_seqs is None:  # as vLLM: never above a batched-token budget the user set
                self.max_num_seqs = min(seqs, self.max_num_batched_tokens or seqs)
            if self.max_num_batched_tokens is None:
                self.max_num_batched_tokens = tokens
        # Every running request must be able to decode in one step.
        self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_num_seqs)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(model=model or "", **kwargs)
