"""`StepTiming`: where an engine's host time goes, step by step. Every engine kind reports
one (`Engine.step_timing()`, `DataParallelEngine.step_timing()`, summed over replicas)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class StepTiming:
    # The step loop (EngineCore.step_core).
    steps: int = 0  # forward passes (a multi-step decode runs several in one dispatch)
    multi_step_runs: int = 0  # dispatches of a multi-step decode
    loop_seconds: float = 0.0  # inside step_core
    wait_seconds: float = 0.0  # waiting for the device's tokens
    # From collecting a step to dispatching the next: the device surely idles meanwhile.
    critical_seconds: float = 0.0
    host_bound_steps: int = 0  # steps whose result was ready before the host came for it
    grammar_mask_seconds: float = 0.0  # filling structured outputs' token bitmasks on the host
    # An engine process's loop around the steps (jaxengine.engine.engine_process): its
    # clients' commands, sending the outputs, and when its last busy spell started and
    # ended (time.perf_counter(), one clock for every process on Linux).
    commands_seconds: float = 0.0
    outputs_seconds: float = 0.0
    busy_start: float | None = None
    busy_end: float | None = None

    def reset(self) -> None:
        """Zero every counter (benchmarks time one run at a time)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)

    def copy(self) -> StepTiming:
        return dataclasses.replace(self)

    @classmethod
    def total(cls, parts: list[StepTiming]) -> StepTiming:
        """Counters summed; the busy spell from the first start to the last end."""
        out = cls()
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "busy_start":
                out.busy_start = min((v for v in values if v is not None), default=None)
            elif f.name == "busy_end":
                out.busy_end = max((v for v in values if v is not None), default=None)
            else:
                setattr(out, f.name, sum(values))
        return out
