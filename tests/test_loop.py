"""LOOP on a tiny random-weight digits-sd pipeline: runs, learns nothing wrong, saves
the adapter only, resumes exactly, exports a LoRA that stock diffusers reproduces."""

import json

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import checkpoint  # noqa: E402
from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from rlprox.zoo.sd import untrained_pipeline

    path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    untrained_pipeline(seed=0).save_pretrained(str(path))
    return path


def loop_recipe(tmp_path, pipeline, **loop):
    cfg = {"pipeline": str(pipeline), "num_samples_per_prompt": 2, "prompts_per_iteration": 2, "num_steps": 3,
           "sample_batch_size": 4, "train_batch_size": 2, "guidance_scale": 2.0, "clip_range": 0.2, **loop}
    return {
        "algo": "loop", "seed": 2,
        "run": {"name": "l", "output_dir": str(tmp_path), "iterations": 2, "log_with": [], "progress": False, "plot": False},
        "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 1.0},
        "loop": cfg,
        "reward": "brightness",
    }


def test_loop_lora_runs_and_saves_the_adapter_only(tmp_path, tiny_pipeline):
    engine = Engine(load_recipe(loop_recipe(tmp_path, tiny_pipeline)))
    unet = engine.algo.unet
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
    assert lora and all(p.requires_grad for n, p in unet.named_parameters() if "lora" in n)
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "reward/std", "reward/zero_std_group_frac", "policy/approx_kl", "policy/clip_frac", "policy/ratio_max", "loss/policy"):
        assert key in stats and stats[key] == stats[key], key
    assert stats["progress/images"] == 2 * 4
    changed = [n for n, p in unet.named_parameters() if "lora" in n and not torch.equal(p, lora[n])]
    assert changed  # only LoRA parameters move
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if "lora" not in n)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint.find_latest(engine.run_dir) / "model.safetensors"))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)
