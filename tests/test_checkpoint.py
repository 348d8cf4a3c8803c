"""Crash safety: SIGKILL + resume is exact, saves are atomic, corrupt files fail in one line."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.recipe import load_recipe
from tests.conftest import ROOT

NONDETERMINISTIC = ("perf/", "optim/")  # wall-clock numbers


def train_cmd(recipe_path, *extra):
    return [sys.executable, "-m", "rlprox", "train", str(recipe_path), *extra]


def comparable(metrics_path):
    rows = [json.loads(line) for line in open(metrics_path)]
    return [{k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)} for row in rows]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_recipe):
    iterations = 40
    env = dict(os.environ, OMP_NUM_THREADS="1")
    recipes = {}
    for name in ("full", "killed"):
        data = tiny_recipe(run={"name": name, "iterations": iterations, "save_every": 1, "keep_last": 2}, env={"normalize_obs": True, "normalize_reward": True})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        recipes[name] = path
    subprocess.run(train_cmd(recipes["full"]), check=True, cwd=ROOT, env=env, capture_output=True)

    kill_after = random.Random().randint(3, 25)
    proc = subprocess.Popen(train_cmd(recipes["killed"]), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
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

    out = subprocess.run(train_cmd(recipes["killed"], "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stderr

    full = load_file(str(tmp_path / "full" / "checkpoints" / f"iter-{iterations:06d}" / "model.safetensors"))
    resumed = load_file(str(run_dir / "checkpoints" / f"iter-{iterations:06d}" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    a, b = comparable(tmp_path / "full" / "metrics.jsonl"), comparable(run_dir / "metrics.jsonl")
    assert len(a) == len(b) == iterations
    assert a == b  # same logged returns and losses, iteration by iteration


def test_crash_during_save_leaves_no_complete_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2, "save_every": 1}))
    engine = Engine(recipe)
    engine.fit()
    good = checkpoint.find_latest(recipe.run_dir)
    assert good.name == "iter-000002"

    def boom(path, obj):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_torch_save", boom)
    engine.state.iteration = 3
    with pytest.raises(OSError):
        checkpoint.save(engine)
    engine.close()
    assert checkpoint.find_latest(recipe.run_dir) == good  # the partial one is invisible
    assert (recipe.run_dir / "checkpoints" / "iter-000003.tmp").exists()
    monkeypatch.undo()
    checkpoint.save(engine)  # the next save cleans the stale temp folder
    assert not (recipe.run_dir / "checkpoints" / "iter-000003.tmp").exists()


def test_keep_last(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(run={"iterations": 5, "save_every": 1, "keep_last": 2}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    assert [p.name for p in checkpoint.list_checkpoints(recipe.run_dir)] == ["iter-000004", "iter-000005"]


@pytest.mark.parametrize("victim", ["model.safetensors", "rank-0.safetensors", "optimizer.pt", "state.json"])
def test_corrupt_checkpoint_one_line_error(tmp_path, tiny_recipe, capsys, victim):
    recipe = load_recipe(tiny_recipe(run={"iterations": 1}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    ckpt = checkpoint.find_latest(recipe.run_dir)
    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 2])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 2})))
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("checkpoint error: ") and victim in err[0], err
    if victim in ("model.safetensors", "rank-0.safetensors"):
        assert main(["eval", str(ckpt), "--episodes", "1"]) == 2
        assert victim in capsys.readouterr().err


def test_eval_of_missing_checkpoint(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("checkpoint error: ")


def test_checkpoint_loading_never_unpickles(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(run={"iterations": 1}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    ckpt = checkpoint.find_latest(recipe.run_dir)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, ckpt / "optimizer.pt")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt"):
        checkpoint.read_torch(ckpt / "optimizer.pt")


def test_resume_after_kill_mid_metrics_line(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2, "save_every": 1}))
    Engine(recipe).fit()
    with open(recipe.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"progress/iteration": 3, "loss/to')  # the kill landed mid-write
    engine = Engine(load_recipe(tiny_recipe(run={"iterations": 3, "resume": "auto"})))
    engine.fit()
    rows = [json.loads(line) for line in open(recipe.run_dir / "metrics.jsonl")]
    assert [r["progress/iteration"] for r in rows] == [1, 2, 3]


def test_fresh_run_after_a_run_killed_before_its_first_checkpoint(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2}))
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "metrics.jsonl").write_text('{"progress/iteration": 1}\n')
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 2})))
    assert main(["train", str(path)]) == 2  # a fresh run does not append to it
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "--resume"]) == 0  # resume=auto, nothing to resume: starts clean
    rows = [json.loads(line) for line in open(recipe.run_dir / "metrics.jsonl")]
    assert [r["progress/iteration"] for r in rows] == [1, 2]


def test_resume_from_older_path_sets_newer_aside_and_eval_still_works(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 4, "save_every": 1, "keep_last": 10}))
    Engine(recipe).fit()
    old = tmp_path / "saved-2"
    import shutil

    shutil.copytree(recipe.run_dir / "checkpoints" / "iter-000002", old)
    engine = Engine(load_recipe(tiny_recipe(run={"iterations": 3, "save_every": 1, "keep_last": 10, "resume": str(old)})))
    engine.fit()
    names = [p.name for p in checkpoint.list_checkpoints(recipe.run_dir)]
    assert names == ["iter-000001", "iter-000002", "iter-000003"]
    assert (recipe.run_dir / "checkpoints" / "abandoned-from-000002" / "iter-000004").is_dir()
    shutil.rmtree(old)  # the path the stored recipe was resumed from is gone
    assert main(["eval", str(recipe.run_dir), "--episodes", "1"]) == 0


def test_non_finite_values_are_logged(tmp_path, tiny_recipe):
    from rlprox.tracking import read_metrics

    engine = Engine(load_recipe(tiny_recipe(run={"iterations": 1})))
    engine.tracker.log({"loss/x": float("nan"), "perf/y": np.float32(2.0), "t": torch.tensor(3.0)}, step=7)
    row = read_metrics(engine.tracker.metrics_path)[-1]
    assert np.isnan(row["loss/x"]) and row["perf/y"] == 2.0 and row["t"] == 3.0
    engine.close()
