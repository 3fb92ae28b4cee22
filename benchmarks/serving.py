"""Serving benchmark: a load generator against the gRPC server, reporting what
`vllm bench serve` reports, and the offline-vs-served throughput ratio at saturation.

    # launch an in-process server on a random-weight preset, three Poisson rates + saturation
    python benchmarks/serving.py --model llama-3.2-1b --request-rate 4 --request-rate 16 --request-rate inf \\
        --num-prompts 512 --input-len 256 --output-len 128 --json results.json

    # the same through the OpenAI HTTP API of the same in-process server
    python benchmarks/serving.py --backend openai --model llama-3.2-1b --request-rate inf --num-prompts 512

    # against a running `jaxengine serve` (no offline comparison)
    python benchmarks/serving.py --target 127.0.0.1:50051 --request-rate 8 --num-prompts 200
    python benchmarks/serving.py --backend openai --target http://127.0.0.1:8000 --request-rate 8

Workload: random token-id prompts of `--input-len` tokens, `--output-len` tokens each with
`ignore_eos` (vLLM's "random" dataset). Arrivals are Poisson at each `--request-rate`
(`inf`: all at once), optionally capped by `--max-concurrency`.

`--backend grpc` streams `Generate` calls; `--backend openai` streams `POST /v1/completions`
with aiohttp as `vllm bench serve` does: token-id prompts and vLLM's `return_token_ids`, so
each SSE chunk carries its tokens as a gRPC message does (a random-weight preset has no
tokenizer, hence no text), and `stream_options.include_usage` for the final count.

In launch mode the engine is built once (in this process, or with `--engine-process` in a
child process) and fronted by a `BackgroundServer`;
the load generator runs in a separate process (spawned, imports only grpc and the stubs) so
the client never competes with the server for this process's GIL. Before timing, greedy
outputs through the server are checked against the offline engine. "Offline" is the same
compiled engine driven directly (all requests added, `step()` until done, on the engine
thread): served / offline output-token throughput at `inf` is the service layer's cost,
reported as the median of `--ratio-repeats` served/offline pairs run back to back.
Every timed run (each rate, and offline) starts with the prefix cache emptied: the runs send
the same prompts, and a run that found them cached would skip their prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from jaxengine.engine.step_timing import StepTiming

# This file is named like the `serving` package: put the repository root, not this directory,
# first on the import path (`python benchmarks/serving.py` puts benchmarks/ there).
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from serving import event_loop  # noqa: E402


# ---------------------------------------------------------------------------- load generator (child process)

class _Call:
    """One streamed call's timeline: TTFT at its first message with tokens, ITL between them."""

    def __init__(self, prompt_tokens: int):
        self.t0 = self.last = time.perf_counter()
        self.ttft: float | None = None
        self.itl: list[float] = []
        self.output_tokens = self.messages = 0
        self.prompt_tokens = prompt_tokens
        self.error = ""

    def message(self, tokens: int) -> None:
        now = time.perf_counter()
        self.messages += 1
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.output_tokens += tokens

    def record(self) -> dict:
        return dict(ok=not self.error, error=self.error, ttft=self.ttft, itl=self.itl, e2e=time.perf_counter() - self.t0,
                    output_tokens=self.output_tokens, messages=self.messages, prompt_tokens=self.prompt_tokens)


async def _one(stub, req, sem, records: list):
    async with sem:
        call = _Call(len(req.token_ids.ids))
        try:
            async for resp in stub.Generate(req):
                if k := sum(len(d.token_ids) for d in resp.outputs):
                    call.message(k)
        except Exception as e:  # noqa: BLE001 - recorded as a failed request
            details = getattr(e, "details", None)  # a grpc.RpcError's message
            call.error = f"{type(e).__name__}: {details() if callable(details) else e}"
        records.append(call.record())


async def _one_openai(session, url: str, body: bytes, prompt_tokens: int, sem, records: list):
    """One streamed completion; its final usage chunk must count the tokens it streamed."""
    async with sem:
        call, usage = _Call(prompt_tokens), None
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                async for line in resp.content:  # SSE: "data: {...}\n\n"
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"error event: {chunk['error'].get('message')}")
                    usage = chunk.get("usage") or usage
                    if k := sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ())):
                        call.message(k)
            if usage is None or usage["completion_tokens"] != call.output_tokens:
                raise RuntimeError(f"the stream's tokens ({call.output_tokens}) are not its usage's ({usage})")
        except Exception as e:  # noqa: BLE001 - recorded as a failed request
            call.error = f"{type(e).__name__}: {e}"
        records.append(call.record())


async def _load(target: str, reqs: list[bytes], rate: float, max_concurrency: int | None, seed: int,
                api_key: str | None, num_channels: int, start_at: float | None = None) -> tuple[list[dict], float]:
    """Send `reqs` (serialized GenerateRequests, or JSON completion bodies when `target` is an
    http:// URL) at Poisson `rate`; (records, seconds from start to the last call's end)."""
    if target.startswith(("http://", "https://")):
        return await _load_openai(target, reqs, rate, max_concurrency, seed, api_key, start_at)
    import grpc

    from serving.generated import engine_pb2 as pb
    from serving.generated import engine_pb2_grpc

    md = (("authorization", f"Bearer {api_key}"),) if api_key else None
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(num_channels)]
    stubs = [engine_pb2_grpc.EngineServiceStub(ch) for ch in channels]
    if md:
        stubs = [_WithMetadata(s, md) for s in stubs]
    requests = [pb.GenerateRequest.FromString(r) for r in reqs]
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency or len(requests))
    records: list[dict] = []
    if start_at is not None:  # several client processes start together (perf_counter is system-wide on Linux)
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    start = time.perf_counter() if start_at is None else start_at
    tasks = []
    for i, req in enumerate(requests):
        tasks.append(asyncio.create_task(_one(stubs[i % len(stubs)], req, sem, records)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    return records, duration


async def _load_openai(base_url: str, reqs: list[bytes], rate: float, max_concurrency: int | None, seed: int,
                       api_key: str | None, start_at: float | None) -> tuple[list[dict], float]:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency or len(reqs))
    records: list[dict] = []
    connector = aiohttp.TCPConnector(limit=0)  # one connection per in-flight request, as a fleet of clients
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=3600)) as session:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        start = time.perf_counter() if start_at is None else start_at
        tasks = []
        for body in reqs:
            tasks.append(asyncio.create_task(_one_openai(session, url, body, len(json.loads(body)["prompt"]), sem, records)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return records, duration


def completion_body(model: str, prompt: list[int], sampling: dict) -> bytes:
    """A streamed /v1/completions request for the same work as a GenerateRequest."""
    return json.dumps(dict(model=model, prompt=prompt, stream=True, stream_options=dict(include_usage=True),
                           return_token_ids=True, **sampling)).encode()


class _WithMetadata:
    def __init__(self, stub, md):
        self._stub, self._md = stub, md

    def Generate(self, req):
        return self._stub.Generate(req, metadata=self._md)


def run_load(target, reqs, rate, max_concurrency, seed, api_key=None, num_channels=4, start_at=None, loop="auto"):
    """Entry point of a spawned client process: (records, seconds from start to the last call's end)."""
    return event_loop.run(_load(target, reqs, rate, max_concurrency, seed, api_key, num_channels, start_at), loop)


def run_load_split(pool, num_procs: int, target, reqs, rate, max_concurrency, seed, api_key=None, num_channels=4,
                   start_at: float | None = None, loop: str = "auto"):
    """The load spread over `num_procs` client processes of `pool` (one Python process
    receives ~10 k streamed messages/s): each sends every num_procs-th request, at
    rate / num_procs (Poisson arrivals merge into Poisson at `rate`), all from `start_at`
    (time.perf_counter(); default: in a second, time for idle pool processes to start)."""
    if start_at is None:
        start_at = time.perf_counter() + 1.0
    per_proc = None if max_concurrency is None else max(1, math.ceil(max_concurrency / num_procs))
    parts = [pool.submit(run_load, target, reqs[i::num_procs], rate / num_procs, per_proc, seed + i, api_key,
                         num_channels, start_at, loop) for i in range(num_procs)]
    results = [f.result() for f in parts]
    return [r for records, _ in results for r in records], max(d for _, d in results)


# ---------------------------------------------------------------------------- metrics

def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return dict(mean=float("nan"), median=float("nan"), p99=float("nan"))
    v = sorted(values)
    p99 = v[min(len(v) - 1, max(0, math.ceil(0.99 * len(v)) - 1))]
    return dict(mean=statistics.fmean(v) * scale, median=statistics.median(v) * scale, p99=p99 * scale)


def summarize(records: list[dict], duration: float) -> dict:
    done = [r for r in records if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in done)
    in_tokens = sum(r["prompt_tokens"] for r in done)
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in done if r["ttft"] is not None and r["output_tokens"] > 1]
    return dict(
        completed=len(done), failed=len(records) - len(done), duration_s=duration,
        request_throughput=len(done) / duration, output_token_throughput=out_tokens / duration,
        total_token_throughput=(in_tokens + out_tokens) / duration, total_output_tokens=out_tokens,
        # > 1 when the server coalesced tokens the stream had not sent yet (it fell behind the engine)
        tokens_per_message=out_tokens / max(1, sum(r["messages"] for r in done)),
        ttft_ms=_stats([r["ttft"] for r in done if r["ttft"] is not None]), tpot_ms=_stats(tpot),
        itl_ms=_stats([x for r in done for x in r["itl"]]), e2e_ms=_stats([r["e2e"] for r in done]),
        errors=sorted({r["error"] for r in records if not r["ok"]})[:5],
    )


def print_summary(name: str, s: dict) -> None:
    print(f"{'=' * 16} Serving Benchmark Result ({name}) {'=' * 16}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_token_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}"),
            ("Output tokens per message", f"{s['tokens_per_message']:.2f}")]
    if "engine" in s:
        rows += [("Engine steps", s["engine"]["steps"]), ("Engine output tokens per step", f"{s['engine']['tokens_per_step']:.1f}"),
                 ("Engine steps/s", f"{s['engine']['steps_per_s']:.1f}"),
                 ("Steps the host made the device wait (%)", f"{100 * s['engine']['host_bound_fraction']:.1f}"),
                 ("Engine loop s: steps / commands / outputs", "{seconds_in_step:.3f} / {seconds_in_commands:.3f} / "
                                                               "{seconds_in_outputs:.3f}".format(**s["engine"])),
                 ("Engine idle s: before first / after last",
                  f"{s['engine'].get('ramp_s', float('nan')):.3f} / {s['engine'].get('tail_s', float('nan')):.3f}"),
                 ("Engine requests running / waiting, mean", f"{s['engine'].get('mean_running', float('nan')):.1f} / "
                                                              f"{s['engine'].get('mean_waiting', float('nan')):.1f}")]
    for label, key in (("Time to First Token", "ttft_ms"), ("Time per Output Token (excl. 1st token)", "tpot_ms"),
                       ("Inter-token Latency", "itl_ms"), ("End-to-end Latency", "e2e_ms")):
        rows.append((f"---{label}---", ""))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {key.split('_')[0].upper()} (ms)", f"{s[key][stat]:.2f}"))
    for label, value in rows:
        print(f"{label:<42}{value}")
    if s["errors"]:
        print("errors:", *s["errors"], sep="\n  ")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessGroups(NamedTuple):
    """The benchmark's processes, by role, for where a run's CPU went."""

    groups: dict[str, list[int]]

    def sample(self) -> dict[str, list[float]]:
        return {name: [_cpu_seconds(p) for p in pids] for name, pids in self.groups.items()}

    @staticmethod
    def busy(before: dict[str, list[float]], after: dict[str, list[float]], seconds: float) -> dict[str, list[float]]:
        """Each process's CPU use over the run, in cores (1.0: one core all the time)."""
        return {name: [round((b - a) / seconds, 3) for a, b in zip(before[name], after[name])] for name in before}


# ---------------------------------------------------------------------------- offline reference (engine thread)

def _offline(engine, prompts: list[list[int]], params) -> tuple[float, int, list[list[int]]]:
    from jaxengine.outputs import OutputKind

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"offline-{i}-{t0}", output_kind=OutputKind.FINAL_ONLY)
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = [t for c in o.outputs for t in c.token_ids]
    seconds = time.perf_counter() - t0
    ordered = [outs[f"offline-{i}-{t0}"] for i in range(len(prompts))]
    return seconds, sum(len(o) for o in ordered), ordered


def _cold_prefix_cache(async_engine) -> None:
    """Empty the prefix cache before a timed run (launch mode; a no-op against --target)."""
    if async_engine is not None and not async_engine.call(_reset_prefix_cache).result():
        print("warning: the prefix cache could not be reset (blocks in use); this run may hit it", file=sys.stderr)


def _reset_prefix_cache(engine) -> bool:
    return engine.reset_prefix_cache()  # a DataParallelEngine resets each replica


def _timing(engine) -> StepTiming:
    return engine.step_timing()


def _queue_depth(engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats["num_running"], stats["num_waiting"]


def _watch_queue(async_engine, done, period: float = 0.05) -> list[tuple[float, int, int]]:
    """(seconds, running, waiting) of the engine's scheduler while a run is in flight."""
    t0, samples = time.perf_counter(), []
    while not done.wait(period):
        running, waiting = async_engine.call(_queue_depth).result()
        samples.append((round(time.perf_counter() - t0, 3), running, waiting))
    return samples


def _queue_summary(samples: list[tuple[float, int, int]]) -> dict:
    """Is the engine's batch full, and do requests reach it? (running is capped at max_num_seqs)"""
    if not samples:
        return {}
    return dict(mean_running=statistics.fmean(r for _, r, _ in samples),
                mean_waiting=statistics.fmean(w for _, _, w in samples),
                timeline=samples[:: max(1, len(samples) // 40)])


def _engine_delta(before: StepTiming, after: StepTiming, out_tokens: int, duration: float) -> dict:
    """The engine's own counters over one run: is it the engine or the service that is slow?"""
    steps = after.steps - before.steps
    bound = after.host_bound_steps - before.host_bound_steps
    return dict(steps=steps, tokens_per_step=out_tokens / max(1, steps), steps_per_s=steps / duration,
                host_bound_fraction=bound / max(1, steps),
                seconds_in_step=after.loop_seconds - before.loop_seconds,
                # An engine process's loop beside the steps: its clients' commands, and sending outputs.
                seconds_in_commands=after.commands_seconds - before.commands_seconds,
                seconds_in_outputs=after.outputs_seconds - before.outputs_seconds)


def _device_info(engine) -> dict:  # asked of the engine: this process may not own the GPU
    import jax

    return dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, num_devices=jax.device_count())


def _openai_model(base_url: str, api_key: str | None) -> tuple[str, str, int]:
    """(id, "", max_model_len) of the one model a running server lists at GET /v1/models."""
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=60) as resp:
        card = json.load(resp)["data"][0]
    return card["id"], "", card["max_model_len"]


def _openai_token_ids(base_url: str, model: str, prompt: list[int], sampling: dict) -> list[int]:
    """A non-streamed completion's token ids (vLLM's `return_token_ids`)."""
    import urllib.request

    body = json.dumps(dict(model=model, prompt=prompt, return_token_ids=True, **sampling)).encode()
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)["choices"][0]["token_ids"]


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from serving.cli import _add_engine_args, engine_kwargs

    p = argparse.ArgumentParser(description="jaxengine serving benchmark (gRPC or the OpenAI HTTP API)")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: the Generate stream; openai: POST /v1/completions with SSE")
    p.add_argument("--target", default=None, help="a running server (default: launch one in-process): host:port for "
                                                  "grpc, http://host:port for openai")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--backend openai --target: the model's vocabulary size, for random prompts "
                        "(the HTTP API does not report it)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", action="append", type=float, help="requests/s, Poisson; inf = all at once (repeatable)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--num-channels", type=int, default=4, help="gRPC channels the load generator spreads calls over")
    p.add_argument("--no-offline", action="store_true", help="skip the offline-vs-served comparison")
    p.add_argument("--ratio-repeats", type=int, default=3,
                   help="served-at-inf / offline pairs behind the reported ratio (their median)")
    p.add_argument("--engine-process", action="store_true", help="launch mode: the engine in a child process (EngineProcess)")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="launch mode: gRPC front-end processes on the port (needs --engine-process; serving/frontends.py)")
    p.add_argument("--num-client-processes", type=int, default=1, help="load-generator processes the calls are split over")
    p.add_argument("--bench-seed", type=int, default=0)
    p.add_argument("--loop", choices=event_loop.LOOPS, default="auto",
                   help="event loop of the launched server and of the client processes (serving/event_loop.py)")
    p.add_argument("--json", default=None, help="write the results here")
    _add_engine_args(p)
    args = p.parse_args(argv)
    rates = args.request_rate or [math.inf]

    from serving.generated import engine_pb2 as pb

    if args.api_server_count > 1 and not (args.engine_process and args.target is None):
        p.error("--api-server-count > 1 needs --engine-process (launch mode)")
    if args.backend == "openai" and args.target is not None and args.vocab_size is None:
        p.error("--backend openai --target needs --vocab-size")
    if args.backend == "openai" and args.target is not None and not args.target.startswith(("http://", "https://")):
        p.error(f"--backend openai needs --target http://host:port, got {args.target!r}")
    server = async_engine = frontends = None
    target = args.target
    result: dict = dict(config={k: v for k, v in vars(args).items()}, git_sha=_git_sha())
    if target is None:
        from jaxengine import AsyncEngine, Engine, EngineConfig
        from serving.server import BackgroundServer, ServeOptions

        kw = engine_kwargs(args)
        if args.num_kv_blocks is not None:
            kw["num_kv_blocks"] = args.num_kv_blocks
        t0 = time.perf_counter()
        if args.engine_process:
            from jaxengine.engine.engine_process import EngineProcess

            async_engine = EngineProcess(EngineConfig.from_kwargs(args.model, **kw), num_clients=args.api_server_count)
        else:
            async_engine = AsyncEngine(Engine(EngineConfig.from_kwargs(args.model, **kw)))
        print(f"engine ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        options = ServeOptions(port=0, model_name=args.model or "default", reuse_port=args.api_server_count > 1, loop=args.loop,
                               http_port=0 if args.backend == "openai" else None)
        server = BackgroundServer(async_engine, options)
        target = server.address if args.backend == "grpc" else f"http://{options.host}:{server.server.http_port}"
        if args.api_server_count > 1:
            from serving.frontends import FrontendProcesses
            from serving.launch import frontend_options

            frontends = FrontendProcesses(frontend_options(server.server), async_engine.client_connections)
        result.update(async_engine.call(_device_info).result(), engine_process=args.engine_process)

    from serving.client import Client

    if args.backend == "openai" and args.target is not None:
        model_name, architecture, max_len, vocab_size = _openai_model(args.target, args.api_key) + (args.vocab_size,)
    else:
        with Client(server.address if server is not None else target, api_key=args.api_key, timeout=600) as c:
            info = c.model_info()
        model_name, architecture, max_len, vocab_size = info.model, info.architecture, info.max_model_len, info.vocab_size
    if args.input_len + args.output_len > max_len:
        p.error(f"--input-len + --output-len must be <= max_model_len={max_len}")
    rng = random.Random(args.bench_seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    sampling = dict(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    if args.backend == "grpc":
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=pr), sampling_params=pb.SamplingParams(**sampling))
                .SerializeToString() for pr in prompts]
    else:
        served_name = server.options.model_name if server is not None else model_name
        reqs = [completion_body(served_name, pr, sampling) for pr in prompts]
    result.update(model=model_name, architecture=architecture, max_model_len=max_len, backend=args.backend)

    # Correctness first: greedy through the server == the offline engine (launch mode).
    if async_engine is not None:
        from jaxengine import SamplingParams

        # One request at a time on both paths, prefix cache emptied before each: the same batch
        # shapes and no cache hits, so the numerics match exactly (random bf16 weights give
        # near-tied logits that a different batch composition can flip).
        check = prompts[:4]
        want, got = [], []
        with Client(server.address, timeout=600) as c:
            for pr in check:
                async_engine.call(_reset_prefix_cache).result()
                want += async_engine.call(_offline, [pr], SamplingParams(**sampling)).result()[2]
                async_engine.call(_reset_prefix_cache).result()
                if args.backend == "grpc":
                    got.append(list(c.generate(pr, **sampling).token_ids))
                else:
                    got.append(_openai_token_ids(target, server.options.model_name, pr, sampling))
        if got != want:
            print("error: served greedy output differs from the offline engine", file=sys.stderr)
            return 1
        print("correctness: served greedy output == offline engine output (4 prompts)", file=sys.stderr)

    def save() -> None:  # after each phase: a run cut off by a time limit keeps what it has
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))

    ctx = multiprocessing.get_context("spawn")
    nproc = args.num_client_processes
    offline_ref = async_engine is not None and not args.no_offline

    def served(rate: float, name: str) -> dict:
        _cold_prefix_cache(async_engine)
        before = async_engine.call(_timing).result() if async_engine is not None else None
        done = threading.Event()
        watcher = concurrent.futures.ThreadPoolExecutor(1).submit(_watch_queue, async_engine, done) \
            if async_engine is not None else None
        start_at = time.perf_counter() + 1.0
        cpu_before, cpu_t0 = procs.sample(), time.perf_counter()
        records, duration = run_load_split(pool, nproc, target, reqs, rate, args.max_concurrency, args.bench_seed,
                                           args.api_key, args.num_channels, start_at, args.loop)
        done.set()
        s = summarize(records, duration)
        s["cpu_cores"] = ProcessGroups.busy(cpu_before, procs.sample(), time.perf_counter() - max(cpu_t0, start_at))
        if before is not None:
            after = async_engine.call(_timing).result()
            s["engine"] = _engine_delta(before, after, s["total_output_tokens"], duration)
            s["engine"].update(_queue_summary(watcher.result()))
            if math.isinf(rate) and after.busy_start is not None and after.busy_end is not None:
                # One busy spell: where the run's ends went (perf_counter is one clock for every
                # process on Linux, CLOCK_MONOTONIC).
                s["engine"].update(ramp_s=after.busy_start - start_at, tail_s=start_at + duration - after.busy_end)
        print_summary(name, s)
        print("CPU cores busy per process: " + "; ".join(f"{k} {' '.join(f'{c:.2f}' for c in v)}"
                                                      for k, v in s["cpu_cores"].items()))
        return s

    def offline() -> dict:
        from jaxengine import SamplingParams

        _cold_prefix_cache(async_engine)
        seconds, tokens, _ = async_engine.call(_offline, prompts, SamplingParams(**sampling)).result()
        print(f"offline engine: {len(prompts)} requests in {seconds:.2f}s, {tokens / seconds:.2f} output tok/s")
        return dict(duration_s=seconds, output_token_throughput=tokens / seconds, request_throughput=len(prompts) / seconds)

    with concurrent.futures.ProcessPoolExecutor(nproc, mp_context=ctx) as pool:
        # Warm-up through the whole path (and the client processes' imports).
        run_load_split(pool, nproc, target, reqs[: min(8 * nproc, len(reqs))], math.inf, None, 1, args.api_key, 1,
                       loop=args.loop)
        groups = {"this (server)": [os.getpid()], "clients": list(pool._processes)}
        if args.engine_process and async_engine is not None:
            groups["engine"] = [async_engine.process.pid]
        if frontends is not None:
            groups["front-ends"] = frontends.pids
        procs = ProcessGroups(groups)
        result["runs"] = {}
        for rate in rates:
            name = f"rate={rate:g}" + (f", max_concurrency={args.max_concurrency}" if args.max_concurrency else "")
            result["runs"][str(rate)] = served(rate, name)
            save()
        if offline_ref:
            result["offline"] = offline()
            sat = result["runs"].get("inf")
            if sat is not None:
                # Served and offline alternate, each pair back to back: one pair's ratio moves
                # with the machine (offline alone has measured 49-56 k tok/s in one lease).
                pairs = [(sat["output_token_throughput"], result["offline"]["output_token_throughput"])]
                for k in range(1, args.ratio_repeats):
                    again = served(math.inf, f"rate=inf, repeat {k}")
                    pairs.append((again["output_token_throughput"], offline()["output_token_throughput"]))
                ratios = [a / b for a, b in pairs]
                result["served_over_offline_pairs"] = [dict(served=a, offline=b, ratio=r) for (a, b), r in zip(pairs, ratios)]
                result["served_over_offline"] = statistics.median(ratios)
                print("served / offline output throughput at saturation: "
                      + ", ".join(f"{r:.3f}" for r in ratios) + f" (median {statistics.median(ratios):.3f})")

    save()
    if frontends is not None:
        frontends.terminate()
        frontends.join(60)
    if server is not None:
        server.close()
        async_engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
