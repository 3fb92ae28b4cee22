"""Load time and peak host memory of loading a checkpoint.

    python benchmarks/load_memory.py --preset llama-3.2-1b        # builds a random checkpoint first
    python benchmarks/load_memory.py --model-dir DIR [--json]

Peak host memory is the highest anonymous RSS (RssAnon, sampled every 2 ms) above the level
before loading: memory-mapped weight pages are file cache, not counted, so a loader that
staged a full host copy of the weights before placing them would show ~2x the weight bytes.
On CPU the "device" is host memory, so ~1x is the floor.
"""

import argparse
import json
import tempfile
import threading
import time


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure(model_dir: str, dtype: str = "bfloat16") -> dict:
    import jax
    import jax.numpy as jnp

    from models import load_model

    jax.devices()  # start the backend before the baseline
    base, peak, done = _rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    model = load_model(model_dir, getattr(jnp, dtype))
    leaves = jax.tree.leaves(model)
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    weight_bytes = sum(x.nbytes for x in leaves if hasattr(x, "nbytes"))
    return {"weight_bytes": weight_bytes, "peak_anon_increase": max(peak[0], _rss_anon()) - base,
            "load_seconds": seconds, "device": str(jax.devices()[0].device_kind)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir")
    parser.add_argument("--preset", help="build a random bf16 checkpoint of this preset first")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.preset:
        import subprocess
        import sys

        tmp = tempfile.mkdtemp()
        code = ("import jax.numpy as jnp; from models import random_model, save_hf_checkpoint; "
                f"save_hf_checkpoint(random_model({args.preset!r}), {tmp!r}, jnp.bfloat16)")
        subprocess.run([sys.executable, "-c", code], check=True)  # built in another process: clean RSS here
        args.model_dir = tmp
    result = measure(args.model_dir, args.dtype)
    if args.json:
        print(json.dumps(result))
    else:
        gb = 1 << 30
        print(f"weights {result['weight_bytes'] / gb:.2f} GiB, peak host anon increase "
              f"{result['peak_anon_increase'] / gb:.2f} GiB "
              f"({result['peak_anon_increase'] / result['weight_bytes']:.2f}x), "
              f"load {result['load_seconds']:.1f} s on {result['device']}")


if __name__ == "__main__":
    main()
