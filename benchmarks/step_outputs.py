"""Host cost of a step's outputs: Engine._process (tokens -> OutputRecords) and the engine
process's hand-off to its pipe (_Sender.outputs: prompt ids stripped, pickled), per step of
256 running requests, as CPU time of the engine's thread (so the CPU "device" computing
alongside on a small VM does not blur it). DELTA is what streaming and the gRPC service ask
for on every step; FINAL_ONLY is what offline generation asks for.

    python benchmarks/step_outputs.py [--kind DELTA|FINAL_ONLY] [--requests 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxengine import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxengine.engine_process import _Sender  # noqa: E402
from jaxengine.outputs import OutputKind  # noqa: E402


class _NullConn:  # the pipe's far end: measure the engine side only
    def send_bytes(self, data: bytes) -> None:
        pass

    def send(self, msg) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["DELTA", "FINAL_ONLY"], default="DELTA")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(EngineConfig.from_kwargs("tiny-llama", dtype="float32", max_model_len=512, max_num_seqs=args.requests,
                                             max_num_batched_tokens=4096, num_kv_blocks=4096), progress=False)
    sender, spent = _Sender(_NullConn()), {"outputs": 0.0, "steps": 0}
    process = engine._process

    def timed(done):
        t = time.thread_time()
        records = process(done)
        spent["outputs"] += time.thread_time() - t
        spent["steps"] += 1
        return records

    engine._process = timed
    rng = np.random.default_rng(0)
    for rep in range(args.repeats):
        for i in range(args.requests):
            engine.add_request(rng.integers(0, 500, 64).tolist(), SamplingParams(max_tokens=64, ignore_eos=True, temperature=0),
                               request_id=f"r{rep}-{i}", output_kind=OutputKind[args.kind])
        spent.update(outputs=0.0, steps=0)
        to_pipe = 0.0
        while engine.has_unfinished_requests():
            records = engine.step_records()
            t = time.thread_time()
            sender.outputs(records)
            to_pipe += time.thread_time() - t
        n = spent["steps"]
        print(f"{args.kind} x {args.requests}: outputs {1e3 * spent['outputs'] / n:.3f} ms/step, "
              f"to the pipe {1e3 * to_pipe / n:.3f} ms/step ({n} steps)")
    sender.close()


if __name__ == "__main__":
    main()
