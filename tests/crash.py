"""Kill a training run with SIGKILL at a random checkpoint, resume it, and compare
with an uninterrupted run: the helper every trainer's exact-resume test uses."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from rlprox import checkpoint
from tests.conftest import ROOT

NONDETERMINISTIC = ("perf/", "optim/")  # wall-clock numbers


def train_cmd(recipe_path, *extra):
    return [sys.executable, "-m", "rlprox", "train", str(recipe_path), *extra]


def comparable(metrics_path):
    rows = [json.loads(line) for line in open(metrics_path)]
    return [{k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)} for row in rows]


def kill_resume_equals_uninterrupted(tmp_path, make_recipe, iterations: int, timeout: float = 180.0):
    """``make_recipe(name) -> dict`` (saving every iteration). Runs "full" to the end,
    kills "killed" with SIGKILL after a random checkpoint, resumes it with --resume,
    and asserts the final weights and every logged row are identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    paths = {}
    for name in ("full", "killed"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(make_recipe(name)))
        paths[name] = path
    subprocess.run(train_cmd(paths["full"]), check=True, cwd=ROOT, env=env, capture_output=True)

    kill_after = random.Random().randint(2, iterations - 3)
    proc = subprocess.Popen(
        train_cmd(paths["killed"]), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / "killed"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        latest = checkpoint.find_latest(run_dir)
        if latest is not None and int(latest.name.split("-")[1]) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.find_latest(run_dir)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < iterations

    out = subprocess.run(train_cmd(paths["killed"], "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr

    final = f"iter-{iterations:06d}"
    full = load_file(str(tmp_path / "full" / "checkpoints" / final / "model.safetensors"))
    resumed = load_file(str(run_dir / "checkpoints" / final / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    a, b = comparable(tmp_path / "full" / "metrics.jsonl"), comparable(run_dir / "metrics.jsonl")
    assert len(a) == len(b) == iterations
    assert a == b  # same logged stats, iteration by iteration
    return full
