"""benchmarks/dispatch_cost.py runs on CPU (tiny model, multi-step included) and reports
every call it times, and the trace summary."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dispatch_cost_on_cpu(tmp_path):
    out = tmp_path / "dispatch.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch_cost.py"), "--preset", "tiny-llama",
                    "--max-model-len", "256", "--num-requests", "8", "--max-num-batched-tokens", "64",
                    "--num-scheduler-steps", "4", "--calls", "3", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["num_seqs"] == 8 and result["num_scheduler_steps"] == 4
    assert len(result["calls"]) == 5 and any(name.startswith("4-step") for name in result["calls"])
    for ms in result["calls"].values():
        assert all(v > 0 for v in ms.values())
    assert result["trace"]["host"]  # the host's dispatch spans were found
