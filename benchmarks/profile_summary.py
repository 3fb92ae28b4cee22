"""Where the device time goes, from a `jax.profiler` trace: busy time per device, the gaps
between kernels, the kernels grouped by kind (attention, matmul, collective, other), and the
host's dispatch spans (e.g. XLA's `command_buffer::update`).

    python benchmarks/profile_summary.py TRACE_DIR          # the log_dir given to jax.profiler.trace
    python benchmarks/profile_summary.py TRACE_DIR --window 60 --window-out w.json.gz  # + 60 ms of kernels
    python benchmarks/throughput.py ... --profile $OUT/trace # records one and prints this

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes. On a GPU every kernel is an event on a `/device:GPU:k` stream; on CPU (tests) the
XLA ops of the host's compute threads stand in for them.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

# First match wins; names as XLA/cuBLAS/NCCL/Triton/Mosaic print them.
KINDS = (
    ("attention", re.compile(r"ragged_paged_attention|paged_attention|flash|attention", re.I)),
    # XLA's own all-reduce kernels (not NCCL's) print with underscores: "all_reduce".
    ("collective", re.compile(r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|all[-_]?to[-_]?all|collective", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|wgmma|dot|matmul|sm\d+_", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def _trace_file(trace_dir: Path) -> Path:
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True")
    return files[-1]


def _events(trace_dir: str | Path) -> tuple[list[dict], list[dict], dict[int, str]]:
    """(kernels, the other complete events, pid -> process name) of the trace: the kernels of
    the device streams, or on CPU the fusions on XLA's compute threads."""
    with gzip.open(_trace_file(Path(trace_dir))) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}

    def is_kernel(e) -> bool:
        if device_pids:
            return e["pid"] in device_pids
        # CPU: the fusions, not the executor spans that wrap them or the waits.
        return "XLA" in threads.get((e["pid"], e["tid"]), "") and not re.match(r"ThunkExecutor|.*Await", e["name"])

    kernels, others = [], []
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            (kernels if is_kernel(e) else others).append(e)
    return kernels, others, procs


def summarize(trace_dir: str | Path, top: int = 40) -> dict:
    """{"devices": {name: {busy_s, span_s, idle_fraction}}, "kinds": {kind: seconds},
    "modules": {program: {kind: seconds}},
    "top": [(kernel, seconds, calls)], "host": [(span, seconds, calls)]}, the kernels over the
    device streams (or the CPU's XLA threads), the host spans over the other threads.
    "kinds" and "top" sum over all devices: divide by their count for one device's share."""
    kernels, others, procs = _events(trace_dir)
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    # Per XLA program (GPU kernels carry their "hlo_module"): the forward's steps apart from
    # the multi-step decode's, and the sampler's.
    modules: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in kernels:
        spans[procs.get(e["pid"], str(e["pid"]))].append((e["ts"], e["ts"] + e["dur"]))
        acc = by_name[e["name"]]
        acc[0] += e["dur"] * 1e-6
        acc[1] += 1
        module = (e.get("args") or {}).get("hlo_module", "?")
        modules[module][kind_of(e["name"])] += e["dur"] * 1e-6
    devices = {}
    for dev, intervals in spans.items():
        intervals.sort()
        busy, end = 0.0, -float("inf")
        for a, b in intervals:  # union of the intervals: overlapping streams count once
            if b > end:
                busy += b - max(a, end)
                end = b
        span = end - intervals[0][0]  # `end` is now the latest end
        devices[dev] = dict(busy_s=busy * 1e-6, span_s=span * 1e-6, idle_fraction=1 - busy / span if span else 0.0)
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, (seconds, _) in by_name.items():
        kinds[kind_of(name)] += seconds
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    # The host side of dispatch: JAX's and XLA's own spans (jit dispatch, argument handling,
    # executable launch, command-buffer updates), not the Python frames ("$file:line fn").
    host: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in others:
        if not e["name"].startswith("$"):
            acc = host[e["name"]]
            acc[0] += e["dur"] * 1e-6
            acc[1] += 1
    host_ranked = sorted(host.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(devices=devices, kinds=dict(kinds), modules={m: dict(k) for m, k in modules.items()}, top=[(name, s, n) for name, (s, n) in ranked],
                host=[(name, s, n) for name, (s, n) in host_ranked])


def window(trace_dir: str | Path, ms: float = 60.0) -> list[dict]:
    """The kernels of every device that start within `ms` after the trace's median kernel start
    (a stretch of steady decode in a run's trace), in time order: device, stream, name, start
    (us from the window's start), duration (us), XLA op and program. The order, durations and
    gaps of one layer's kernels, side by side for the devices of a tensor-parallel run."""
    kernels, _, procs = _events(trace_dir)
    kernels.sort(key=lambda e: e["ts"])
    t0 = kernels[len(kernels) // 2]["ts"] if kernels else 0.0
    return [dict(device=procs.get(e["pid"], str(e["pid"])), stream=e["tid"], name=e["name"], start_us=e["ts"] - t0,
                 dur_us=e["dur"], op=(e.get("args") or {}).get("hlo_op", ""), program=(e.get("args") or {}).get("hlo_module", ""))
            for e in kernels if t0 <= e["ts"] < t0 + ms * 1e3]


def print_window(rows: list[dict], n: int = 60) -> None:
    """The first `n` kernels of the window on its first device, each with the idle gap before it."""
    first = [r for r in rows if r["device"] == rows[0]["device"]][:n] if rows else []
    end = None
    for r in first:
        gap = 0.0 if end is None else r["start_us"] - end
        end = max(end or 0.0, r["start_us"] + r["dur_us"])
        print(f"  {r['start_us']:9.1f} us  gap {gap:6.1f}  dur {r['dur_us']:7.1f}  stream {r['stream']:<5} {r['name'][:50]:50} {r['op'][:30]}")


def print_summary(summary: dict) -> None:
    for dev, d in summary["devices"].items():
        print(f"{dev}: busy {d['busy_s'] * 1e3:.1f} ms of {d['span_s'] * 1e3:.1f} ms ({d['idle_fraction']:.1%} idle)")
    total = sum(summary["kinds"].values()) or 1.0
    print("by kind: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})"
                                  for k, v in sorted(summary["kinds"].items(), key=lambda kv: -kv[1])))
    for module, kinds in sorted(summary.get("modules", {}).items(), key=lambda mk: -sum(mk[1].values())):
        print(f"  program {module[:60]}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(kinds.items())))
    for name, seconds, calls in summary["top"]:
        print(f"  {seconds * 1e3:9.2f} ms {calls:6d}x  {kind_of(name):10} {name[:90]}")
    print("host spans (dispatch):")
    for name, seconds, calls in summary.get("host", [])[:20]:
        print(f"  {seconds * 1e3:9.2f} ms {calls:6d}x  {name[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--window", type=float, default=0.0, metavar="MS",
                    help="also print the kernels of MS milliseconds from the trace's middle (first device)")
    ap.add_argument("--window-out", default=None, metavar="PATH.json.gz", help="and write that window (all devices) here")
    args = ap.parse_args()
    print_summary(summarize(args.trace_dir, args.top))
    if args.window:
        rows = window(args.trace_dir, args.window)
        print_window(rows)
        if args.window_out:
            with gzip.open(args.window_out, "wt") as f:
                json.dump(rows, f)


if __name__ == "__main__":
    main()
