"""The benchmarks' harness keeps finished runs small and portable: a pruned run folder moved to
another place (another machine's checkout, or committed under benchmarks/results/runs/) is read
back as the same run instead of trained again."""

import shutil
import sys

from tests.conftest import ROOT

sys.path.insert(0, f"{ROOT}/benchmarks")
import harness  # noqa: E402

RECIPE = "recipes/ppo/cartpole.yaml"
TINY = ["run.iterations=1", "env.num_envs=2", "ppo.num_steps=16", "ppo.minibatch_size=8", "ppo.update_epochs=1"]


def test_a_pruned_run_moved_elsewhere_is_read_back_not_trained(tmp_path, monkeypatch):
    first = tmp_path / "a"
    rows, ev = harness.train_and_eval(RECIPE, TINY, first, "r", ["--episodes", "2"], keep_weights=False)
    files = sorted(p.relative_to(first / "r").as_posix() for p in (first / "r").rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("checkpoints/")] == ["checkpoints/iter-000001/eval.json"], files
    assert rows and "eval/return" in ev
    moved = tmp_path / "b"
    shutil.copytree(first, moved)
    shutil.rmtree(first)

    def no_runs(cmd, what):
        raise AssertionError(f"ran {what}")

    monkeypatch.setattr(harness, "_run_command", no_runs)
    again, ev2 = harness.train_and_eval(RECIPE, TINY, moved, "r", ["--episodes", "2"], reuse=True)
    assert again == rows and ev2["eval/return"] == ev["eval/return"]
    assert harness.train_and_eval(RECIPE, [*TINY, "seed=9"], moved, "r", ["--episodes", "2"], read_only=True) is None


def test_a_run_of_an_edited_recipe_is_not_read_back(tmp_path):
    recipe = tmp_path / "cartpole.yaml"
    shutil.copy(f"{ROOT}/{RECIPE}", recipe)
    runs = tmp_path / "runs"
    harness.train_and_eval(str(recipe), TINY, runs, "r", ["--episodes", "1"], keep_weights=False)
    assert harness.train_and_eval(str(recipe), TINY, runs, "r", ["--episodes", "1"], read_only=True) is not None
    recipe.write_text(recipe.read_text().replace("gamma: 0.98", "gamma: 0.97"))
    assert harness.train_and_eval(str(recipe), TINY, runs, "r", ["--episodes", "1"], read_only=True) is None
    assert not harness.torchrun_finished(str(recipe), TINY, runs, "r")


def test_a_comment_in_the_recipe_does_not_make_a_run_stale(tmp_path):
    recipe = tmp_path / "cartpole.yaml"
    shutil.copy(f"{ROOT}/{RECIPE}", recipe)
    before = harness._recipe_hash(str(recipe))
    recipe.write_text("# a new comment\n" + recipe.read_text())
    assert harness._recipe_hash(str(recipe)) == before
