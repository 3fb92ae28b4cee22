"""Runs the multi-device tests in a subprocess with 8 (or 4) virtual CPU devices (XLA reads
the device count once, when JAX starts; the rest of the suite runs on one device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODULES = {"tests/models/sharding/test_tensor_parallel.py": 8, "tests/models/sharding/test_moe_tensor_parallel.py": 4}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_on_virtual_cpu_devices(module):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={MODULES[module]}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"{module} failed on {MODULES[module]} CPU devices:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
