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


@pytest.mark.slow  # ~40 s on 2 cores: .ci/run runs it after make test
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


def test_the_qwen_case_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "qwen.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--case", "qwen", "--size", "tiny", "--allow-cpu"]
        + ["--iterations", "2", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert "| qwen | tiny | 2 | 16 |" in table, table


def test_the_qwen_cases_full_size_pipeline_builds_on_the_meta_device(monkeypatch):
    """The GPU-only path: Qwen-Image's widths at 8 of its 60 blocks and a Qwen2.5-VL-7B-wide text encoder,
    constructed without weights (save_pretrained stubbed)."""
    import torch
    from diffusers import QwenImagePipeline

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_smoke

    built = {}
    monkeypatch.setattr(QwenImagePipeline, "save_pretrained", lambda self, path: built.update(pipe=self))
    with torch.device("meta"):
        _, params = gpu_smoke.random_qwen_pipeline(None, "full")
    pipe = built["pipe"]
    assert 2.5e9 < params < 3e9 and len(pipe.transformer.transformer_blocks) == 8  # ~340M a block
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.joint_attention_dim == 3584
    assert pipe.text_encoder.config.text_config.hidden_size == 3584


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
