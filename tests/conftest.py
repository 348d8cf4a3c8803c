import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ppo(tmp_path, **sections) -> dict:
    """A CartPole PPO recipe dict small enough for a unit test."""
    recipe = {
        "algo": "ppo",
        "seed": 3,
        "run": {
            "name": "t",
            "output_dir": str(tmp_path),
            "iterations": 3,
            "log_with": [],
            "progress": False,
            "plot": False,
        },
        "env": {"id": "CartPole-v1", "num_envs": 2},
        "ppo": {"num_steps": 16, "minibatch_size": 8, "update_epochs": 2},
        "optim": {"lr": 1e-3},
    }
    for key, value in sections.items():
        if value is None:
            continue
        recipe.setdefault(key, {}).update(value)
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path):
    return lambda **sections: tiny_ppo(tmp_path, **sections)


def film(tmp_path, recipe: dict, episodes: int) -> dict:
    """Train ``recipe`` (a dict) with the CLI, then ``rlprox eval --video`` of ``episodes``
    episodes into ``tmp_path/v``; asserts the videos replay the evaluation's episodes (the
    same returns) and gives eval.json."""
    import json

    import yaml

    from rlprox.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    run = tmp_path / recipe["run"]["name"]
    video = ["--video", str(tmp_path / "v"), "--video-episodes", str(episodes)]
    assert main(["eval", str(run), "--episodes", str(episodes), *video]) == 0
    reported = json.loads(next((run / "checkpoints").iterdir()).joinpath("eval.json").read_text())
    assert sorted(v["return"] for v in reported["videos"]) == sorted(reported["values"]["return"])
    return reported
