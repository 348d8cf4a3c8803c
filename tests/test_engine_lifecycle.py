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
