"""benchmarks/gpu_smoke.py's generative cases run end to end on CPU at a tiny size (the GPU runs
use the same code at full size)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent


def test_the_nft_case_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "nft.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--case", "nft", "--size", "tiny", "--allow-cpu"]
        + ["--iterations", "2", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "| GRPO (SDE steps, ratio) |" in table and "| NFT (old policy's ODE, no likelihood) |" in table


def test_the_wan_case_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "wan.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--case", "wan", "--size", "tiny", "--allow-cpu"]
        + ["--iterations", "2", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "GPU smoke test: wan (tiny, random weights)" in table and "| wan | tiny | 2 | 8" in table
