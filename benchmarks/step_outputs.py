"""Host cost of a step's outputs, per step of 256 running requests, as CPU time of the
engine's thread (so the CPU "device" computing alongside on a small VM does not blur it):
- core: EngineCore._outputs (the step's token ids -> CoreOutputs), on the step loop always;
- to the pipe: pickling CoreOutputs as ClientLink.send does, on an engine process's step loop;
- processor: OutputProcessor.process (CoreOutputs -> OutputRecords), on the step loop of an
  in-process Engine, in the front-end processes of an engine process.
DELTA is what streaming and the gRPC service ask for on every step; FINAL_ONLY is what
offline generation asks for.

    python benchmarks/step_outputs.py [--kind DELTA|FINAL_ONLY] [--requests 256]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxengine import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxengine.outputs import OutputKind  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["DELTA", "FINAL_ONLY"], default="DELTA")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(EngineConfig.from_kwargs("tiny-llama", dtype="float32", max_model_len=512, max_num_seqs=args.requests,
                                             max_num_batched_tokens=4096, num_kv_blocks=4096), progress=False)
    spent = {"core": 0.0, "processor": 0.0}

    def timed(name, fn):
        def run(*args):
            t = time.thread_time()
            result = fn(*args)
            spent[name] += time.thread_time() - t
            return result
        return run

    engine._outputs = timed("core", engine._outputs)
    engine.processor.process = timed("processor", engine.processor.process)
    rng = np.random.default_rng(0)
    for rep in range(args.repeats):
        for i in range(args.requests):
            engine.add_request(rng.integers(0, 500, 64).tolist(), SamplingParams(max_tokens=64, ignore_eos=True, temperature=0),
                               request_id=f"r{rep}-{i}", output_kind=OutputKind[args.kind])
        spent.update(core=0.0, processor=0.0)
        to_pipe, n = 0.0, 0
        while engine.has_unfinished_requests():
            out = engine.step_core()
            t = time.thread_time()
            pickle.dumps(("outputs", out), protocol=pickle.HIGHEST_PROTOCOL)  # ClientLink.send's work
            to_pipe += time.thread_time() - t
            records, stops = engine.processor.process(out)
            assert not stops
            n += 1
        print(f"{args.kind} x {args.requests}: core {1e3 * spent['core'] / n:.3f} ms/step, "
              f"to the pipe {1e3 * to_pipe / n:.3f} ms/step, processor {1e3 * spent['processor'] / n:.3f} ms/step "
              f"({n} steps)")


if __name__ == "__main__":
    main()
