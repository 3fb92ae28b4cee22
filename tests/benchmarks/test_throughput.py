"""benchmarks/throughput.py runs on CPU (tiny model, multi-step decode on): each run's row is
written as it ends, with the warm-up's breakdown, and every request got its exact length."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_throughput_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny-llama",
                           "--workload", "fixed", "--scheduling", "async", "sync", "--max-model-len", "512",
                           "--max-num-seqs", "16", "--max-num-batched-tokens", "256", "--num-scheduler-steps", "4",
                           "--num-requests", "24", "--out", str(out)],
                          check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())
    assert [(r["engine"], r["requests"]) for r in rows] == [("jaxengine-async", 24), ("jaxengine-sync", 24)]
    for r in rows:
        assert r["all_lengths_exact"] and r["multi_step_runs"] > 0 and r["output_tokens_per_s"] > 0
        assert 0 <= r["device_idle_fraction"] < 1
        phases = r["warmup_breakdown"]
        assert phases["compile_multi_step"]["programs"] > 0 and phases["compile_forward"]["seconds"] > 0
        assert len(r["first_run_seconds"]) == phases["first_runs_forward"]["programs"]
    assert "engine up in" in proc.stderr and "fixed sync:" in proc.stderr  # progress as each phase ends
