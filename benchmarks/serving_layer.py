"""What one gRPC server process can carry, on any machine: the real service (servicer,
`grpc.aio` server, streams, the benchmark's load generator in its own process) in front of a
synthetic engine that emits one token per running request every `--step-ms`, at most
`--running` at once (the rest wait, FIFO), `--output-len` tokens each. The ideal duration is
what the engine alone would take; the gap is the service layer's.

    python benchmarks/serving_layer.py --stream-interval 1 --stream-interval 4 --stream-interval 16

The synthetic engine runs on a thread of the server process (as `AsyncEngine` does), so its
per-step Python shares the server's GIL; with the real engine in its own process
(`EngineProcess`) the server loop is the only Python in the server process.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import math
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import completion_body, run_load, summarize  # noqa: E402
from jaxengine.engine.async_engine import StreamingEngine, StreamItem  # noqa: E402
from jaxengine.outputs import CompletionRecord, OutputRecord  # noqa: E402
from serving.generated import engine_pb2 as pb  # noqa: E402
from serving.server import BackgroundServer, ServeOptions  # noqa: E402


class SyntheticEngine(StreamingEngine):
    """Emits OutputRecords like Engine.step_records, on a timer, with no model behind them."""

    def __init__(self, step_s: float, running: int, output_len: int, stream_interval: int):
        super().__init__()
        self.engine = SimpleNamespace(  # what the servicer reads of an engine
            config=SimpleNamespace(stream_interval=stream_interval, tensor_parallel_size=1, block_size=16),
            tokenizer=None, max_model_len=1 << 20, dtype="bfloat16", num_blocks=0,
            model_config=SimpleNamespace(architecture="synthetic", vocab_size=1000))
        self.step_s, self.max_running, self.output_len = step_s, running, output_len
        self._lock = threading.Lock()
        self._waiting: collections.deque[str] = collections.deque()
        self._running: dict[str, int] = {}
        self.admitted: list[float] = []  # when each request reached the engine
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="synthetic-engine", daemon=True).start()

    def _submit(self, prompt, params, rid, kind, priority) -> concurrent.futures.Future:
        with self._lock:
            self._waiting.append(rid)
            self.admitted.append(time.perf_counter())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(rid)
        return fut

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._running.pop(request_id, None)

    def call(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(None)
        return fut

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            items = []
            with self._lock:
                while self._waiting and len(self._running) < self.max_running:
                    self._running[self._waiting.popleft()] = 0
                for rid in list(self._running):
                    n = self._running[rid] = self._running[rid] + 1
                    done = n >= self.output_len
                    if done:
                        del self._running[rid]
                    completion = CompletionRecord(index=0, text="", token_ids=[7], cumulative_logprob=None,
                                                  logprobs=None, finish_reason="length" if done else None,
                                                  stop_reason=None)
                    rec = OutputRecord(request_id=rid, prompt=None, prompt_token_ids=[0], finished=done,
                                       num_cached_tokens=0, completions=[completion], prompt_logprobs=None,
                                       arrival_time=0.0, first_scheduled_time=None, first_token_time=None,
                                       finished_time=None)
                    items.append(StreamItem(rid, rec, 1, done))
            if items:
                self._send_all(items)
            time.sleep(max(0.0, self.step_s - (time.perf_counter() - t0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream-interval", type=int, action="append")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=5.0, help="the synthetic engine's step (1B on an H200: ~5 ms)")
    ap.add_argument("--num-channels", type=int, default=4)
    ap.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                    help="openai: streamed /v1/completions through the HTTP API of the same server")
    args = ap.parse_args()
    if args.backend == "grpc":
        reqs = [pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 8),
                                   sampling_params=pb.SamplingParams(max_tokens=args.output_len, ignore_eos=True))
                .SerializeToString() for _ in range(args.num_prompts)]
    else:
        reqs = [completion_body("synthetic", [1] * 8, dict(max_tokens=args.output_len, ignore_eos=True))
                for _ in range(args.num_prompts)]
    ideal = math.ceil(args.num_prompts / args.running) * args.output_len * args.step_ms / 1000
    print(f"{args.num_prompts} requests x {args.output_len} tokens, {args.running} running, {args.step_ms} ms steps: "
          f"ideal {ideal:.2f} s, {args.num_prompts * args.output_len / ideal:.0f} tok/s")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        for interval in args.stream_interval or [1]:
            engine = SyntheticEngine(args.step_ms / 1000, args.running, args.output_len, interval)
            server = BackgroundServer(engine, ServeOptions(port=0, model_name="synthetic",
                                                           http_port=0 if args.backend == "openai" else None))
            target = server.address if args.backend == "grpc" else f"http://127.0.0.1:{server.server.http_port}"
            pool.submit(run_load, target, reqs[:8], math.inf, None, 1, None, 1).result()  # warm-up
            engine.admitted.clear()
            t0 = time.perf_counter()
            records, duration = pool.submit(run_load, target, reqs, math.inf, None, 0, None,
                                            args.num_channels).result()
            s = summarize(records, duration)
            admitted = sorted(engine.admitted)
            print(f"stream_interval {interval:3d}: {s['output_token_throughput']:8.0f} tok/s "
                  f"({ideal / duration:.2f} of ideal), {s['tokens_per_message']:.2f} tokens/message, "
                  f"{s['total_output_tokens'] / s['tokens_per_message'] / duration:.0f} messages/s, "
                  f"all requests in the engine after {admitted[-1] - t0:.2f} s, TPOT {s['tpot_ms']['mean']:.1f} ms, "
                  f"failed {s['failed']}")
            server.close()
            engine.shutdown()


if __name__ == "__main__":
    main()
