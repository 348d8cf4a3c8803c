"""Module roles, LoRA-only checkpoints, per-rank streams, image logging and the
trainer-neutral eval, on a test trainer (tests/toy_lora.py) with a frozen encoder and a
peft LoRA adapter on a tiny MLP."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine, reduce_stats
from rlprox.recipe import load_recipe
from tests.crash import kill_resume_equals_uninterrupted
from tests.toy_lora import toy_recipe

pytest.importorskip("peft")


def lora_params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def test_frozen_module_is_never_trained_wrapped_or_saved(tmp_path):
    engine = Engine(load_recipe(toy_recipe(tmp_path)))
    algo = engine.algo
    encoder_before = {k: v.clone() for k, v in algo.encoder.state_dict().items()}
    base_before = {n: p.detach().clone() for n, p in algo.policy.named_parameters() if "lora_" not in n}
    lora_before = lora_params(algo.policy)
    optimized = {id(p) for g in engine.base_optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in algo.encoder.parameters())
    assert optimized == {id(p) for n, p in algo.policy.named_parameters() if "lora_" in n}
    assert not algo.encoder.training and not any(p.requires_grad for p in algo.encoder.parameters())
    engine.fit()
    engine.close()
    for k, v in algo.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    for n, p in algo.policy.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, lora_before[n]), n  # the adapter learned
        else:
            assert torch.equal(p, base_before[n]), n  # the base did not move
    ckpt = checkpoint.find_latest(engine.run_dir)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(k.startswith("policy.") and ".lora_" in k for k in saved), sorted(saved)
    assert sorted(saved) == sorted(f"policy.{n}" for n in lora_before)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["frozen_modules"] == ["encoder"] and state["frozen_parameters"] == {"policy": 4}


def test_lora_checkpoint_reloads_into_a_fresh_build_and_evaluates(tmp_path, capsys):
    engine = Engine(load_recipe(toy_recipe(tmp_path, log_with=["tensorboard"], eval_size=6, eval_every=2)))
    engine.fit()
    engine.close()
    run_dir = engine.run_dir
    # sample grids during training: PNGs in the run folder and images in TensorBoard
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["samples-000002.png", "samples-000004.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run_dir / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "samples" in events.Tags()["images"]
    # rlprox eval rebuilds the frozen base from the recipe and loads the adapter only
    assert main(["eval", str(run_dir), "--num-samples", "5"]) == 0
    out = capsys.readouterr().out
    assert "reward" in out and "samples" in out
    ckpt = checkpoint.find_latest(run_dir)
    result = json.loads((ckpt / "eval.json").read_text())
    assert len(result["values"]["reward"]) == 5 and result["eval/count"] == 5
    assert (ckpt / "eval_samples.png").is_file()
    trained = lora_params(engine.algo.policy)
    assert main(["export", str(run_dir), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(exported) == len(trained)


def test_eval_flags_of_another_trainer_are_one_line_errors(tmp_path, capsys):
    engine = Engine(load_recipe(toy_recipe(tmp_path, iterations=1)))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--episodes", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --episodes does not apply to algo toy_lora (it evaluates samples; use --num-samples)"
    assert main(["eval", str(engine.run_dir), "--stochastic"]) == 2
    assert "--deterministic/--stochastic does not apply" in capsys.readouterr().err
    assert main(["eval", str(engine.run_dir), "--guidance-scale", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --guidance-scale does not apply to algo toy_lora"
    assert main(["eval", str(engine.run_dir), "--cfg", "1.5"]) == 2  # the deprecated flag: one line, then the same
    assert capsys.readouterr().err.strip().splitlines() == [
        "rlprox eval: --cfg is deprecated, use --guidance-scale (the old flag goes in the next release)",
        "error: --guidance-scale does not apply to algo toy_lora",
    ]


def test_frozen_dtype_bf16_keeps_trainable_parameters_fp32(tmp_path):
    engine = Engine(load_recipe(toy_recipe(tmp_path, iterations=2, frozen_dtype="bfloat16", mixed_precision="bf16")))
    algo = engine.algo
    assert all(p.dtype == torch.bfloat16 for p in algo.encoder.parameters())
    for n, p in algo.policy.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16), n
    stats = engine.fit()
    engine.close()
    assert torch.isfinite(torch.tensor(stats["loss/total"]))


def test_lora_resume_after_sigkill_is_bit_identical(tmp_path):
    iterations = 14

    def make(name):
        return toy_recipe(tmp_path, name=name, iterations=iterations, save_every=1, keep_last=2)

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert all(".lora_" in k for k in weights)


def test_regularizer_on_frozen_parameters_is_a_recipe_error(tmp_path, capsys):
    recipe = toy_recipe(tmp_path)
    recipe["regularizers"] = [{"type": "l1", "params": "policy.*base_layer.weight", "lam": 0.1}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "recipe error: regularizers[0].params: 'policy.*base_layer.weight' "
        "matches frozen parameter 'policy.base_model.model.inp.base_layer.weight'"
    ), err
    assert "\n" not in err


def test_reduce_stats_rules_single_process():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    stats = {"a": 2.0, "n": 3, "r": 4.0, "m": 5.0, "gone": float("nan"), "zero": 0}
    out = reduce_stats(stats, {"n": "sum", "r": "mean:n", "m": "max", "gone": "mean:zero", "zero": "sum"}, acc)
    assert out == {"a": 2.0, "n": 3.0, "r": 4.0, "m": 5.0, "zero": 0.0}  # a weighted key with no weight is left out
