"""The prepared GPU check (``benchmarks/gpu_check.py``) walks every step on CPU (``--dry-run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the GPU check has no kernels to walk")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_walks_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("env", "kernel-tests", "kernels", "e2e", "kv-tests", "kv-attention", "sparse24"):
        assert f"| {step} | ok |" in summary, summary
    assert "tests collected" in (tmp_path / "kernel-tests.log").read_text()
    e2e = (tmp_path / "results_dry_e2e.md").read_text()
    assert "SmolLM2-135M-shaped" in e2e and "| w8a8-int8-sq-dynamic |" in e2e and "failed" not in e2e
    kernels = (tmp_path / "results_dry_kernels.md").read_text()
    assert "| Llama-3-8B |" in kernels and "W4A8 int8 g128" in kernels
    assert "| int4 KIVI" in (tmp_path / "results_dry_kv_attention.md").read_text()
    assert "fp8_e4m3: stored pair = torch's CUTLASS conversion: True" in (tmp_path / "sparse24.log").read_text()
