"""Tier 4: end-to-end learning runs (minutes). Run with `make test-slow` (pytest -m slow)."""

import json

import pytest

from rlprox.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cartpole_recipe_reaches_475_within_100k_steps(tmp_path, seed, capsys):
    recipe = f"{ROOT}/recipes/ppo/cartpole.yaml"
    code = main(
        [
            "train",
            recipe,
            f"seed={seed}",
            f"run.output_dir={tmp_path}",
            "run.name=cp",
            "run.log_with=[]",
            "run.progress=false",
            "run.eval_size=0",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in open(tmp_path / "cp" / "metrics.jsonl")]
    assert rows[-1]["progress/env_steps"] <= 100_000
    assert main(["eval", str(tmp_path / "cp"), "--episodes", "20", "--deterministic"]) == 0
    result = json.loads(next((tmp_path / "cp" / "checkpoints").glob("iter-*/eval.json")).read_text())
    assert result["unit"] == "episodes" and result["eval/count"] == 20
    assert result["eval/return"] >= 475, result["eval/return"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sparse_cartpole_policy(tmp_path, seed, capsys):
    recipe = f"{ROOT}/recipes/ppo/cartpole-sparse.yaml"
    assert (
        main(
            [
                "train",
                recipe,
                f"seed={seed}",
                f"run.output_dir={tmp_path}",
                "run.name=sp",
                "run.log_with=[]",
                "run.progress=false",
                "run.eval_size=0",
            ]
        )
        == 0
    )
    assert main(["eval", str(tmp_path / "sp"), "--episodes", "20"]) == 0
    result = json.loads(next((tmp_path / "sp" / "checkpoints").glob("iter-*/eval.json")).read_text())
    assert result["eval/return"] >= 475, result["eval/return"]
    assert result["sparsity/actor_hidden_neurons_zero_fraction"] >= 0.5
