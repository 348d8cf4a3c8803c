"""Lifecycle: fit saves an iteration's checkpoint before evaluating it, so an evaluation
that raises loses no saved iteration, and once its cause is fixed the run evaluates
(``rlprox eval``) or resumes from where it stopped. The trainer is a plugin named in the
recipe as ``module:SPEC``, the way a user's trainer is."""

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

from rlprox import checkpoint
from rlprox.algos import TrainerSpec
from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.recipe import load_recipe
from rlprox.runtime import EvalShard
from rlprox.tracking import read_metrics

TARGET = 3.0


class FlakyEval:
    """Fits one weight to TARGET by least squares; ``evaluate`` raises while ``broken``
    (a stand-in for a reward model or metric that fails at the end of a run)."""

    broken = False

    def __init__(self, recipe, runtime, loss_terms=None):
        self.modules = {"policy": nn.Linear(1, 1, bias=False)}
        self.batch = recipe.flaky.batch
        self.runtime = runtime

    def collect(self):
        return torch.randn(self.batch, 1, generator=self.runtime.generator)

    def loss(self, x):
        pred = self.modules["policy"](x)
        return (pred - TARGET * x).pow(2).mean(), {}

    def evaluate(self, request):
        if self.broken:
            raise RuntimeError("evaluation failed")
        err = (self.modules["policy"].weight.item() - TARGET) ** 2
        return EvalShard(values={"neg_error": [-err] * request.num})


@dataclass
class FlakyConfig:
    batch: int = 8  # samples per iteration


SPEC = TrainerSpec(name="flaky_eval", build=FlakyEval, sections={"flaky": FlakyConfig}, eval_unit="samples")


def flaky_recipe(tmp_path, **run) -> dict:
    return {
        "algo": f"{__name__}:SPEC",
        "seed": 2,
        "run": {
            "name": "flaky",
            "output_dir": str(tmp_path),
            "log_with": [],
            "progress": False,
            "plot": False,
            "eval_size": 4,
            **run,
        },
        "optim": {"name": "sgd", "lr": 0.1, "max_grad_norm": 0.0},
    }


def test_final_eval_that_raises_keeps_the_last_iteration_and_rlprox_eval_works(tmp_path, monkeypatch, capsys):
    path = tmp_path / "flaky.yaml"
    path.write_text(yaml.safe_dump(flaky_recipe(tmp_path, iterations=3, save_every=2, eval_every=0)))
    run_dir = tmp_path / "flaky"
    monkeypatch.setattr(FlakyEval, "broken", True)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(["train", str(path)])
    assert checkpoint.find_latest(run_dir).name == "iter-000003"  # saved before the failing evaluation
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["progress/iteration"] for r in rows] == [1, 2, 3] and not any("eval/count" in r for r in rows)

    monkeypatch.setattr(FlakyEval, "broken", False)  # the cause fixed
    assert main(["eval", str(run_dir)]) == 0
    result = json.loads((run_dir / "checkpoints" / "iter-000003" / "eval.json").read_text())
    assert result["eval/count"] == 4 and result["eval/neg_error"] <= 0
    capsys.readouterr()


def test_eval_and_save_at_one_iteration_saves_first_then_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(FlakyEval, "broken", True)
    engine = Engine(load_recipe(flaky_recipe(tmp_path, iterations=4, save_every=2, eval_every=2)))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        engine.fit()
    engine.close()
    assert checkpoint.find_latest(tmp_path / "flaky").name == "iter-000002"

    monkeypatch.setattr(FlakyEval, "broken", False)
    engine = Engine(load_recipe(flaky_recipe(tmp_path, iterations=4, save_every=2, eval_every=2, resume="auto")))
    stats = engine.fit()
    engine.close()
    assert engine.state.iteration == 4 and stats["eval/count"] == 4
    rows = read_metrics(tmp_path / "flaky" / "metrics.jsonl")
    # one row per iteration; the evaluation's stats are in its iteration's row
    assert [r["progress/iteration"] for r in rows] == [1, 2, 3, 4]
    assert "eval/neg_error" in rows[3] and "loss/total" in rows[3] and "eval/count" not in rows[1]


def test_checkpoint_with_the_old_scheduler_json_still_resumes(tmp_path):
    engine = Engine(load_recipe(flaky_recipe(tmp_path, iterations=2)))
    engine.fit()
    engine.close()
    latest = checkpoint.find_latest(tmp_path / "flaky")
    (latest / "lr_schedule.json").rename(latest / "scheduler.json")  # the name before lr_schedule
    engine = Engine(load_recipe(flaky_recipe(tmp_path, iterations=3, resume="auto")))
    engine.fit()
    engine.close()
    assert engine.state.iteration == 3 and engine.lr_schedule.last_epoch == 3


# ----------------------------------------------------------------------------- edges of resume, eval and progress
# flaky.batch stands in for a key that fixes the shape of the saved state (loop.finetune: LoRA or full)
KEYED = TrainerSpec(
    name="flaky_keyed",
    build=FlakyEval,
    sections={"flaky": FlakyConfig},
    eval_unit="samples",
    eval_flags=("prompts",),
    resume_keys=("flaky.batch",),
)


def keyed_run(tmp_path, **run):
    path = tmp_path / "keyed.yaml"
    recipe = flaky_recipe(tmp_path, iterations=1, **run)
    recipe["algo"] = f"{__name__}:KEYED"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    return path, tmp_path / "flaky"


def test_resume_with_another_value_of_a_resume_key_names_both(tmp_path, capsys):
    path, run_dir = keyed_run(tmp_path)
    ckpt = checkpoint.find_latest(run_dir)
    saved, metrics = (ckpt / "model.safetensors").read_bytes(), (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", str(path), "run.iterations=2", "flaky.batch=4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"recipe error: flaky.batch: the checkpoint {ckpt} was saved with flaky.batch=8 and this run has "
        "flaky.batch=4; it fixes the shape of the saved state: resume with flaky.batch=8, or start another run "
        "with run.name=NEW"
    ]
    assert (ckpt / "model.safetensors").read_bytes() == saved and (run_dir / "metrics.jsonl").read_text() == metrics
    assert main(["train", str(path), "run.iterations=2", "flaky.batch=8", "--resume"]) == 0


def test_eval_prompts_file_not_utf8_is_one_line(tmp_path, capsys):
    _, run_dir = keyed_run(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red seven\n".encode("utf-16"))
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --prompts: {prompts} is not UTF-8 text (byte 0xff at offset 0): save it as UTF-8"]


def test_each_eval_keeps_its_own_folder_and_the_latest_shows_in_the_checkpoint(tmp_path, capsys):
    _, run_dir = keyed_run(tmp_path)
    ckpt = checkpoint.find_latest(run_dir)
    assert main(["eval", str(run_dir), "--num-samples", "2"]) == 0
    assert main(["eval", str(run_dir), "--num-samples", "3"]) == 0
    first, second = (json.loads((ckpt / f"eval-00{i}" / "eval.json").read_text()) for i in (1, 2))
    assert first["eval/count"] == 2 and second["eval/count"] == 3
    assert json.loads((ckpt / "eval.json").read_text()) == second
    assert f"{ckpt / 'eval-002' / 'eval.json'}" in capsys.readouterr().out


def test_progress_on_a_terminal_names_each_phase(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _, run_dir = keyed_run(tmp_path, progress=True)
    assert "flaky (evaluating 4 samples)" in capsys.readouterr().err  # the final evaluation, on the bar
    assert main(["eval", str(run_dir)]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2  # no export format: after loading
    err = capsys.readouterr().err
    assert f"loading {checkpoint.find_latest(run_dir)} (algo flaky_keyed) …\nevaluating 4 samples …\n" in err
    assert f"loading {checkpoint.find_latest(run_dir)} …\n" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # redirected: no phase lines
    assert main(["eval", str(run_dir)]) == 0
    assert "evaluating" not in capsys.readouterr().err


def test_the_bar_rate_leaves_evaluation_time_out(tmp_path):
    import time
    from types import SimpleNamespace

    from rlprox.tracking import Tracker

    recipe = load_recipe(flaky_recipe(tmp_path, progress=True))
    tracker = Tracker(SimpleNamespace(is_main_process=True), tmp_path, recipe)
    tracker.start(total=2)
    tracker.log({"loss/total": 1.0}, step=1)
    with tracker.phase("evaluating"):
        time.sleep(0.5)
    assert tracker.bar.format_dict["elapsed"] < 0.4
    tracker.bar.close()
