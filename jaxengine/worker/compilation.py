"""What the runner compiles and when: the shape buckets, the start-up warm-up, the persistent cache.

Shapes are bucketed so XLA compiles a handful of programs at start-up and none in steady
state: the flat token count T is padded up to a power of two (>= 16) and the sequence count
S to one of a few sizes (never more than T).

Warm-up compiles every program ahead of the KV cache's allocation, against an abstract cache
of the real shape: on a GPU, XLA autotunes each matmul by running candidates in free device
memory, and a cache sized to the memory budget leaves none. The first runs that follow hit
the same executables (same shapes and shardings) and fill jit's dispatch cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
from tqdm import tqdm


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two >= n, and >= lo."""
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The padded sizes a step may take: T (flat tokens) and S (sequences)."""

    tokens: tuple[int, ...]  # powers of two up to the token budget
    seqs: tuple[int, ...]  # a few sizes up to max_num_seqs

    @classmethod
    def for_budget(cls, max_num_batched_tokens: int, max_num_seqs: int) -> Buckets:
        top = pow2_at_least(max_num_batched_tokens, 1)
        tokens = tuple(b for b in (2**i for i in range(31)) if min(16, top) <= b <= top)
        seqs = tuple(sorted({min(s, max_num_seqs) for s in (16, 64)} | {max_num_seqs}))
        return cls(tokens, seqs)

    def token_bucket(self, n: int) -> int:
        return _bucket(self.tokens, n, "scheduled token count")

    def seq_bucket(self, n: int, t: int) -> int:
        """The S bucket of n sequences in a step of T bucket t."""
        return min(_bucket(self.seqs, n, "sequence count"), t)

    def steps(self) -> list[tuple[int, int]]:
        """Every (T, S) bucket of a step."""
        return sorted({(t, min(s, t)) for t in self.tokens for s in self.seqs})

    def decodes(self) -> list[tuple[int, int]]:
        """The (T, S) buckets of a decode-only step of 1..max_num_seqs requests."""
        return sorted({(t, self.seq_bucket(n, t)) for n in range(1, self.seqs[-1] + 1) for t in [self.token_bucket(n)]})


def _bucket(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} {n} is larger than the largest bucket {buckets[-1]}")


# ------------------------------------------------------------------------------- warm-up


@dataclasses.dataclass(frozen=True)
class Program:
    """One program to warm up: lowered against the abstract KV cache, then run once on the real one."""

    name: str  # e.g. "forward T=16 S=16"
    lower: Callable[[], jax.stages.Lowered]
    run: Callable[[], Any]  # dispatches it; returns what to wait for


@dataclasses.dataclass(frozen=True)
class ProgramGroup:
    name: str  # "forward", "sampler", "multi_step": the phases compile_<name>, first_runs_<name>
    programs: list[Program]
    time_first_runs: bool = False  # record each first run's seconds (WarmupReport.first_runs)


class WarmupPhase(NamedTuple):
    programs: int
    seconds: float


class FirstRun(NamedTuple):
    name: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    seconds: float
    # Per phase, in order: compile_<group>..., allocate_kv_cache, first_runs_<group>...
    phases: dict[str, WarmupPhase]
    # The first run of each program of the groups that time them. Each is timed on its own:
    # on 70B TP 4 the 41 first runs took 55 s, and which of them is slow is the question.
    first_runs: list[FirstRun]


def warm_up(groups: list[ProgramGroup], allocate: Callable[[], None], *, progress: bool = True,
            compile_threads: int = 1) -> WarmupReport:
    """Compile every program of `groups`, then `allocate` the KV cache, then run each program once.

    Lowering (tracing, Python) runs one program at a time; XLA's compile releases the GIL,
    so up to `compile_threads` programs compile at once while the next ones are lowered.
    A model's layers are unrolled, so each program's compile time grows with its depth."""
    t0 = time.perf_counter()
    phases: dict[str, WarmupPhase] = {}
    first_runs: list[FirstRun] = []
    clock = t0

    def phase(name: str, n: int) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = WarmupPhase(n, now - clock)
        clock = now

    total = 2 * sum(len(g.programs) for g in groups)
    with tqdm(total=total, desc="compiling", disable=not progress, unit="program") as bar, \
            ThreadPoolExecutor(max(1, compile_threads), thread_name_prefix="compile") as pool:

        def compile_all(lowerings: Iterable[jax.stages.Lowered]) -> None:  # lowered as the pool compiles
            for future in [pool.submit(lowered.compile) for lowered in lowerings]:
                future.result()
                bar.update()

        def lowerings(group: ProgramGroup) -> Iterator[jax.stages.Lowered]:
            return (p.lower() for p in group.programs)

        for group in groups:
            compile_all(lowerings(group))
            phase(f"compile_{group.name}", len(group.programs))
        allocate()
        phase("allocate_kv_cache", 0)
        for group in groups:
            for program in group.programs:
                since = time.perf_counter()
                jax.block_until_ready(program.run())
                if group.time_first_runs:
                    first_runs.append(FirstRun(program.name, time.perf_counter() - since))
                bar.update()
            phase(f"first_runs_{group.name}", len(group.programs))
    return WarmupReport(time.perf_counter() - t0, phases, first_runs)


# ------------------------------------------------------------------ persistent cache


def use_persistent_compilation_cache(cache_dir: str) -> None:
    """Keep every compiled program in XLA's persistent cache at `cache_dir`, so a second start
    with the same shapes compiles nothing. Every program, the small ones too: JAX's defaults
    skip programs that compile in under a second (most sampler variants and small buckets),
    and a warm start would still compile those one after another."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no size threshold, and none that JAX may pick for the file system (0 lets it).
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
