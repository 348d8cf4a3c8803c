"""benchmarks/gpu_smoke.py's cases run end to end on CPU at a tiny size (the GPU runs use the
same code at full size)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_case(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", *args, "--size", "tiny", "--allow-cpu"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_nft_case_runs_on_cpu_at_a_tiny_size(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    out = tmp_path / "nft.md"
    done = run_case("--case", "nft", "--iterations", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "| GRPO (SDE steps, ratio) |" in table and "| NFT (old policy's ODE, no likelihood) |" in table


def test_the_atari_case_runs_compile_off_and_on_at_a_tiny_size(tmp_path):
    """PPO with the Nature CNN on 36×36 synthetic frame stacks, run.compile off then on
    (one compilation of the tiny CNN on CPU)."""
    out = tmp_path / "atari.md"
    done = run_case("--case", "atari", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "StackedFrames, synthetic 4×36×36 frames" in table
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| o")}
    assert set(rows) == {"| off", "| on", "| on / off"}
    assert rows["| off"].endswith("| - |") and rows["| on"].endswith("| - |")  # no CUDA: no peak memory
