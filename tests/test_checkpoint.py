"""Crash safety: SIGKILL + resume is exact, saves are atomic, corrupt files fail in one line."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.recipe import load_recipe
from tests.crash import kill_resume_equals_uninterrupted


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_recipe):
    iterations = 40

    def make(name):
        return tiny_recipe(
            run={"name": name, "iterations": iterations, "save_every": 1, "keep_last": 2},
            env={"normalize_obs": True, "normalize_reward": True},
        )

    kill_resume_equals_uninterrupted(tmp_path, make, iterations)


def test_crash_during_save_leaves_no_complete_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2, "save_every": 1}))
    engine = Engine(recipe)
    engine.fit()
    good = checkpoint.find_latest(recipe.run_dir)
    assert good.name == "iter-000002"

    write_json = checkpoint._write_json

    def boom(path, obj):
        if path.name != "optimizer.json":
            return write_json(path, obj)
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", boom)
    engine.state.iteration = 3
    with pytest.raises(OSError):
        checkpoint.save(engine.state)
    engine.close()
    assert checkpoint.find_latest(recipe.run_dir) == good  # the partial one is invisible
    assert (recipe.run_dir / "checkpoints" / "iter-000003.tmp").exists()
    monkeypatch.undo()
    checkpoint.save(engine.state)  # the next save cleans the stale temp folder
    assert not (recipe.run_dir / "checkpoints" / "iter-000003.tmp").exists()


def test_keep_last(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(run={"iterations": 5, "save_every": 1, "keep_last": 2}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    assert [p.name for p in checkpoint.list_checkpoints(recipe.run_dir)] == ["iter-000004", "iter-000005"]


@pytest.mark.parametrize(
    "victim",
    [
        "model.safetensors",
        "rank-0.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "lr_schedule.json",
        "state.json",
    ],
)
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


def test_resume_of_a_corrupt_newest_checkpoint_names_the_older_one(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2, "save_every": 1}))
    Engine(recipe).fit()
    older, newest = checkpoint.list_checkpoints(recipe.run_dir)
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 3, "save_every": 1})))
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"checkpoint error: {newest / 'model.safetensors'}: corrupt"), err
    assert err[0].endswith(f"; the previous complete checkpoint is {older}: resume from it with run.resume={older}"), (
        err
    )
    assert (newest / "model.safetensors").read_bytes() == data[: len(data) // 2]  # nothing moved or deleted
    assert main(["train", str(path), f"run.resume={older}"]) == 0  # as the line says
    assert checkpoint.find_latest(recipe.run_dir).name == "iter-000003"


def test_eval_of_missing_checkpoint(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("checkpoint error: ")


def test_checkpoint_files_are_never_pickles(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(run={"iterations": 1}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    ckpt = checkpoint.find_latest(recipe.run_dir)
    for f in ckpt.iterdir():
        assert f.suffix in (".json", ".safetensors", ".yaml"), f.name
    state = json.loads((ckpt / "optimizer.json").read_text())
    assert state["param_groups"][0]["params"][0].startswith("policy.")  # named, not indexed
    assert any(k.endswith("/exp_avg_sq") for k in load_file(str(ckpt / "optimizer.safetensors")))


def test_optimizer_state_of_other_parameters_is_refused_in_one_line(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 1}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    ckpt = checkpoint.find_latest(recipe.run_dir)
    state = json.loads((ckpt / "optimizer.json").read_text())
    state["param_groups"][0]["params"][0] = "policy.renamed.weight"
    (ckpt / "optimizer.json").write_text(json.dumps(state))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 2})))
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("checkpoint error: ")
        and "optimizer.safetensors: does not match this recipe's parameters (saved 'policy.renamed.weight'" in err
        and "\n" not in err
    )


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
    (recipe.run_dir / "logs").mkdir()
    assert main(["train", str(path), "--resume"]) == 0  # resume=auto, nothing to resume: starts clean
    rows = [json.loads(line) for line in open(recipe.run_dir / "metrics.jsonl")]
    assert [r["progress/iteration"] for r in rows] == [1, 2]


def test_a_run_folder_without_checkpoint_is_replaced_without_overwrite(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 2}))
    (recipe.run_dir / "logs").mkdir(parents=True)
    (recipe.run_dir / "metrics.jsonl").write_text('{"progress/iteration": 1}\n')  # died before its first save
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(run={"iterations": 2})))
    assert main(["train", str(path)]) == 0  # the same command, no run.overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{recipe.run_dir} holds no checkpoint (a run stopped before its first save): replacing it"]
    rows = [json.loads(line) for line in open(recipe.run_dir / "metrics.jsonl")]
    assert [r["progress/iteration"] for r in rows] == [1, 2]


def test_resume_from_older_path_sets_newer_aside_and_eval_still_works(tmp_path, tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(run={"iterations": 4, "save_every": 1, "keep_last": 10}))
    Engine(recipe).fit()
    old = tmp_path / "saved-2"
    import shutil

    shutil.copytree(recipe.run_dir / "checkpoints" / "iter-000002", old)
    engine = Engine(
        load_recipe(tiny_recipe(run={"iterations": 3, "save_every": 1, "keep_last": 10, "resume": str(old)}))
    )
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
