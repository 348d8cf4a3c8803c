"""Shared by the benchmark scripts: train a recipe in a fresh process, evaluate its last
checkpoint with ``rlprox eval``, and hand back the logged rows and the eval results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["run.log_with=[]", "run.progress=false", "run.plot=false", "run.save_every=0"]


def train_and_eval(
    recipe: str, overrides: list[str], out: Path, name: str, eval_args: list[str], reuse: bool = False
) -> tuple[list[dict], dict]:
    """(metrics.jsonl rows, eval.json) of ``rlprox train RECIPE OVERRIDES`` in
    ``out/name`` followed by ``rlprox eval`` with ``eval_args`` (one torch thread).
    ``reuse``: a run that finished both commands with these same arguments (recorded
    in ``out/name/benchmark-run.json``) is read back instead of trained again."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    train = [
        sys.executable,
        "-m",
        "rlprox",
        "train",
        str(ROOT / recipe),
        *overrides,
        f"run.output_dir={out}",
        f"run.name={name}",
        *QUIET,
    ]
    evaluate = [sys.executable, "-m", "rlprox", "eval", str(out / name), *eval_args]
    record = out / name / "benchmark-run.json"
    if reuse and record.exists() and json.loads(record.read_text()) == {"train": train[3:], "eval": evaluate[3:]}:
        return _results(out / name)
    for cmd in (train, evaluate):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name}: rlprox {cmd[3]} failed:\n{done.stderr[-3000:]}")
    record.write_text(json.dumps({"train": train[3:], "eval": evaluate[3:]}))
    return _results(out / name)


def _results(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = sorted((run / "checkpoints").glob("iter-*"))[-1]
    return rows, json.loads((ckpt / "eval.json").read_text()) | {"checkpoint": str(ckpt)}
