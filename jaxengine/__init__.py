"""jaxengine: a JAX/XLA LLM inference engine (paged KV cache, continuous batching,
prefix caching, chunked prefill).

    import jaxengine
    outs = jaxengine.generate(["def fibonacci(n):"], jaxengine.SamplingParams(max_tokens=64))
"""

from jaxengine.config import EngineConfig
from jaxengine.engine.async_engine import AsyncEngine
from jaxengine.engine.data_parallel import DataParallelEngine, make_engine
from jaxengine.engine.engine_process import EngineProcess
from jaxengine.engine.llm_engine import Engine
from jaxengine.engine.step_timing import StepTiming
from jaxengine.entrypoints.llm import LLM, generate
from jaxengine.outputs import CompletionOutput, Logprob, OutputKind, RequestMetrics, RequestOutput
from jaxengine.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "AsyncEngine", "CompletionOutput", "DataParallelEngine", "Engine", "EngineConfig", "EngineProcess", "LLM", "Logprob",
    "OutputKind", "RequestMetrics", "RequestOutput", "SamplingParams", "StepTiming", "StructuredOutputsParams", "generate", "make_engine",
]
