"""Shape buckets, and the persistent compilation cache across engine starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxengine.worker.compilation import Buckets

# One engine start and one request in a fresh process; prints how many programs JAX looked
# up in the persistent cache and how many it found there (jax.monitoring's events).
_START = """
import collections, sys, jax, jaxengine
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
llm = jaxengine.LLM("tiny-llama", dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                    num_kv_blocks=32, compilation_cache_dir=sys.argv[1], progress=False)
llm.generate([[5, 9, 200]], jaxengine.SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
print("LOOKUPS", events["/jax/compilation_cache/compile_requests_use_cache"])
print("HITS", events["/jax/compilation_cache/cache_hits"])
"""


def _start(cache_dir: str) -> tuple[set[str], int, int]:
    """(the cache's files after an engine start, programs compiled, of which read from the cache)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", _START, cache_dir], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("LOOKUPS ", "HITS ")))
    files = {os.path.relpath(os.path.join(d, f), cache_dir) for d, _, fs in os.walk(cache_dir) for f in fs}
    return files, int(counts["LOOKUPS"]), int(counts["HITS"])


def test_a_second_start_compiles_nothing_new(tmp_path):
    # Every program is kept, the small ones too (most of a tiny model's compile in well
    # under a second, JAX's default threshold): the second start finds each one in the
    # cache and writes nothing.
    cache = str(tmp_path / "xla")
    first, lookups, hits = _start(cache)
    assert hits == 0 and len(first) == lookups > 0, (sorted(first), lookups)
    second, lookups, hits = _start(cache)
    assert hits == lookups == len(first), f"{lookups - hits} of {lookups} programs compiled again"
    assert second == first, f"the second start wrote {sorted(second - first)}"


def test_buckets():
    b = Buckets.for_budget(max_num_batched_tokens=100, max_num_seqs=20)
    assert b.tokens == (16, 32, 64, 128) and b.seqs == (16, 20)
    assert (b.token_bucket(17), b.seq_bucket(17, 32), b.seq_bucket(17, 16)) == (32, 20, 16)
    assert b.steps() == [(16, 16), (32, 16), (32, 20), (64, 16), (64, 20), (128, 16), (128, 20)]
    assert b.decodes() == [(16, 16), (32, 20)]  # 1..16 requests in T=16, 17..20 in T=32
    with pytest.raises(ValueError, match="scheduled token count 129 is larger than the largest bucket 128"):
        b.token_bucket(129)
