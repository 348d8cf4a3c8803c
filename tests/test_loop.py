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
from rlprox.models.pipelines import FORMER_SECTION_KEYS  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from tests.toy_pipelines import untrained_sd_pipeline as untrained_pipeline

    path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    untrained_pipeline(seed=0).save_pretrained(str(path))
    return path


def loop_recipe(tmp_path, pipeline, **loop):
    """A tiny LOOP recipe; keyword arguments set loop keys (a family's options go under loop.sampling)."""
    sampling = {key: loop.pop(key) for key in list(loop) if key in FORMER_SECTION_KEYS}
    cfg = {
        "pipeline": str(pipeline),
        "num_samples_per_prompt": 2,
        "prompts_per_iteration": 2,
        "num_steps": 3,
        "sample_batch_size": 4,
        "minibatch_size": 2,
        "guidance_scale": 2.0,
        "clip_coef": 0.2,
        **loop,
    }
    if sampling:
        cfg["sampling"] = sampling
    return {
        "algo": "loop",
        "seed": 2,
        "run": {
            "name": "l",
            "output_dir": str(tmp_path),
            "iterations": 2,
            "log_with": [],
            "progress": False,
            "plot": False,
        },
        "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 1.0},
        "loop": cfg,
        "reward": "brightness",
    }


def test_loop_lora_runs_and_saves_the_adapter_only(tmp_path, tiny_pipeline):
    engine = Engine(load_recipe(loop_recipe(tmp_path, tiny_pipeline)))
    unet = engine.algo.denoiser
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
    assert lora and all(p.requires_grad for n, p in unet.named_parameters() if "lora" in n)
    stats = engine.fit()
    engine.close()
    for key in (
        "reward/mean",
        "reward/std",
        "reward/zero_std_groups",
        "policy/approx_kl",
        "policy/clip_frac",
        "policy/ratio_max",
        "loss/policy",
    ):
        assert key in stats and stats[key] == stats[key], key
    assert stats["progress/images"] == 2 * 4
    changed = [n for n, p in unet.named_parameters() if "lora" in n and not torch.equal(p, lora[n])]
    assert changed  # only LoRA parameters move
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if "lora" not in n)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint.find_latest(engine.run_dir) / "model.safetensors"))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)


def test_ratio_is_one_before_the_first_update(tmp_path, tiny_pipeline):
    engine = Engine(load_recipe(loop_recipe(tmp_path, tiny_pipeline, guidance_scale=1.0)))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        for item in list(algo.minibatches(batch, 0))[:3]:
            _, stats = algo.loss(item)
            assert abs(float(stats["policy/ratio_max"]) - 1.0) < 1e-4 and float(stats["policy/approx_kl"]) < 1e-7
    engine.close()


@pytest.mark.parametrize(
    "plugin,message",
    [
        (
            "raises_on_second_call",
            "reward error: reward 'tests.reward_plugins:raises_on_second_call' raised RuntimeError: scorer crashed",
        ),
        ("wrong_shape", "returned shape (4, 3) for 4 images; expected (4,)"),
        ("all_nan", "returned no finite value for 4 images (all NaN/inf)"),
        ("on_meta", "returned a tensor on device meta; expected cpu"),
    ],
)
def test_bad_reward_plugin_stops_in_one_line_and_keeps_the_checkpoint(
    tmp_path, tiny_pipeline, capsys, plugin, message
):
    from tests import reward_plugins

    reward_plugins.CALLS["n"] = 0
    recipe = loop_recipe(tmp_path, tiny_pipeline, sample_batch_size=4)
    recipe["reward"] = f"tests.reward_plugins:{plugin}"
    recipe["run"].update(iterations=3, save_every=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    saved = checkpoint.list_checkpoints(tmp_path / "l")
    if plugin == "raises_on_second_call":  # the first iteration's checkpoint is intact and loads
        assert [p.name for p in saved] == ["iter-000001"]
        assert (
            main(["eval", str(tmp_path / "l"), "--num-samples", "2", "--prompts", str(tmp_path / "p.txt")]) == 2
        )  # a missing prompts file: one line
    else:
        assert saved == []


def _cli_train(tmp_path, recipe):
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run(
        [sys.executable, "-m", "rlprox", "train", str(path)], capture_output=True, text=True, cwd=ROOT
    )


def test_a_run_prints_no_library_noise(tmp_path, tiny_pipeline):
    """Full fine-tuning with bf16 frozen modules and a final base-vs-tuned evaluation
    (its base UNet loaded late, as the tuned one runs): no transformers torchvision
    fallback notice, no diffusers "kept in float32: []" notice."""
    recipe = loop_recipe(tmp_path, tiny_pipeline, finetune="full")
    recipe["run"].update(eval_size=2, frozen_dtype="bfloat16")
    out = _cli_train(tmp_path, recipe)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr and "float32" not in out.stderr, out.stderr


def test_a_failing_reward_is_the_last_line_under_a_progress_bar(tmp_path, tiny_pipeline):
    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["reward"] = "tests.reward_plugins:raises_on_second_call"
    recipe["run"].update(iterations=3, progress=True)
    out = _cli_train(tmp_path, recipe)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("reward error: reward 'tests.reward_plugins:raises_on_second_call' raised"), lines
    assert sum("error" in line for line in lines) == 1, lines


def test_a_video_reward_on_an_image_model_is_one_line_before_sampling(tmp_path, tiny_pipeline, capsys):
    from rlprox.cli import main

    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["reward"] = "temporal_consistency"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "recipe error: reward: reward 'temporal_consistency' scores videos" in err, err
    assert "this model makes images" in err and "\n" not in err and not (tmp_path / "l").exists(), err


def test_eval_reward_scores_the_evaluation_and_the_reward_the_training(tmp_path, tiny_pipeline, capsys):
    from rlprox.cli import main

    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["run"].update(iterations=1, eval_size=4)
    recipe["eval_reward"] = "tests.reward_plugins:constant"  # 0.1 for every image
    engine = Engine(load_recipe(recipe))
    stats = engine.fit()
    engine.close()
    assert stats["eval/reward"] == pytest.approx(0.1) and stats["eval/base_reward"] == pytest.approx(0.1)
    assert stats["reward/mean"] != pytest.approx(0.1)  # training scored by brightness
    recipe["eval_reward"] = "no_such_reward"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["train", str(path), "run.name=other"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipe error: eval_reward: ") and "no_such_reward" in err and "\n" not in err, err


def test_a_prompt_source_that_gives_nothing_is_a_recipe_error():
    from rlprox.algos.loop import load_prompts
    from rlprox.errors import RecipeError

    with pytest.raises(RecipeError, match=r"^recipe error: loop.eval_prompts: builtins:list gives no prompt$"):
        load_prompts("builtins:list", "loop.eval_prompts")
    with pytest.raises(RecipeError, match=r"^recipe error: loop.prompts: module 'builtins' has no attribute 'nope'"):
        load_prompts("builtins:nope")


def test_individual_nan_rewards_get_zero_advantage_and_are_counted(tmp_path, tiny_pipeline):
    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["reward"] = "tests.reward_plugins:some_nan"
    engine = Engine(load_recipe(recipe))
    batch = engine.algo.advantages(engine.algo.collect())
    assert torch.isnan(batch.rewards).sum() == 1  # one per scored batch of 4
    assert torch.isfinite(batch.advantages).all() and batch.advantages[0] == 0
    stats = engine.algo.iteration_stats(batch, 1.0)
    assert stats["reward/nan_count"] == 1 and stats["reward/flag"] == 1.0
    engine.close()


def test_prompt_stats_uses_batch_stats_until_min_count():
    import numpy as np

    from rlprox.algos.loop import PromptStats

    prompt_stats = PromptStats(buffer_size=4, min_count=3)
    mean, std = prompt_stats.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    assert np.allclose(mean, 3.0) and np.allclose(std, np.std([1.0, 3.0, 5.0]))  # too few: batch statistics
    mean, std = prompt_stats.update(["a", "b"], np.array([5.0, 7.0]))
    assert mean[0] == pytest.approx(3.0) and std[0] == pytest.approx(np.std([1.0, 3.0, 5.0]))  # "a" has 3 now
    assert mean[1] == pytest.approx(6.0)  # "b" has 2: the batch's
    prompt_stats.update(["a"] * 3, np.array([9.0, 9.0, 9.0]))
    assert list(prompt_stats.stats["a"]) == [5.0, 9.0, 9.0, 9.0]  # a deque of the last 4


def test_ddpo_with_one_sample_per_prompt_uses_batch_then_prompt_statistics(tmp_path, tiny_pipeline):
    """K = 1 (DDPO's i.i.d. prompts): below min_count rewards of a prompt the advantage is the batch-normalised
    reward, as ddpo-pytorch's stat tracker; from then on the prompt's own (here: one prompt, 4 samples a round)."""
    import numpy as np

    prompt_file = tmp_path / "one.txt"
    prompt_file.write_text("a red seven\n")
    recipe = loop_recipe(
        tmp_path,
        tiny_pipeline,
        prompts=str(prompt_file),
        advantage="prompt_stats",
        num_samples_per_prompt=1,
        prompts_per_iteration=4,
        prompt_stats_min_count=8,
    )
    engine = Engine(load_recipe(recipe))
    algo, seen = engine.algo, []
    for tracked in (0.0, 1.0):
        batch = algo.advantages(algo.collect())
        r = batch.rewards.double().numpy()
        seen += r.tolist()
        mean, std = (r.mean(), r.std()) if tracked == 0 else (np.mean(seen), np.std(seen))
        assert np.allclose(batch.advantages.numpy(), (r - mean) / (std + 1e-6), rtol=1e-3, atol=1e-3)  # float32
        stats = algo.iteration_stats(batch, 1.0)
        assert stats["reward/prompt_stats_tracked"] == tracked and stats["reward/zero_std_groups"] == 0
    engine.close()


def test_a_misspelt_prompt_set_is_a_recipe_error(tmp_path, tiny_pipeline):
    from rlprox.algos.loop import load_prompts
    from rlprox.recipe import RecipeError

    assert len(load_prompts("digits-paraphrased")[0]) == 700
    with pytest.raises(RecipeError, match=r"loop.prompts: not a prompt set \(digits, digits-paraphrased, digits-"):
        load_recipe(loop_recipe(tmp_path, tiny_pipeline, prompts="digits-paraphrase"))


def test_loop_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_pipeline):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 8

    def make(name):
        recipe = loop_recipe(
            tmp_path, tiny_pipeline, advantage="prompt_stats", prompt_stats_min_count=2, timestep_fraction=0.67
        )
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert all("lora" in k for k in weights)


def test_exported_lora_reproduces_tuned_samples_in_stock_diffusers(tmp_path, tiny_pipeline, capsys):
    recipe = loop_recipe(tmp_path, tiny_pipeline, lora={"rank": 2, "alpha": 8.0}, clip_coef=10.0)
    recipe["optim"]["lr"] = 5e-2  # move the adapter visibly
    recipe["run"]["eval_size"] = 4
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert (
        f'StableDiffusionPipeline.from_pretrained("{tiny_pipeline}").load_lora_weights("{tmp_path / "lora"}")' in out
    )
    from diffusers import StableDiffusionPipeline

    def sample(pipe):
        g = torch.Generator().manual_seed(7)
        return pipe(
            ["a red seven", "a blue two"],
            num_inference_steps=3,
            guidance_scale=2.0,
            eta=1.0,
            generator=g,
            output_type="pt",
        ).images

    tuned = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline))
    tuned.unet = engine.algo.denoiser  # the trained adapter, in place
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline))
    base = sample(stock)
    stock.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(sample(stock), sample(tuned), rtol=1e-4, atol=1e-4)
    assert (sample(stock) - base).abs().max() > 1e-3  # the adapter changes the samples
    # eval: base vs tuned side by side, rewards of both
    assert main(["eval", str(engine.run_dir), "--num-samples", "4"]) == 0
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    for key in ("eval/reward", "eval/base_reward", "eval/reward_eta0", "eval/base_reward_eta0"):
        assert key in result
    assert (checkpoint.find_latest(engine.run_dir) / "eval_base_vs_tuned.png").is_file()
    assert (engine.run_dir / "samples" / "base_vs_tuned-000002.png").is_file()


def test_resume_with_the_other_finetune_mode_names_both(tmp_path, tiny_pipeline, capsys):
    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["run"]["iterations"] = 1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "run.iterations=2", "loop.finetune=full", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: loop.finetune: the checkpoint "), err
    assert "saved with loop.finetune=lora and this run has loop.finetune=full" in err[0]


def test_export_needs_no_reward_plugin_and_eval_still_checks_it(tmp_path, tiny_pipeline, capsys):
    """An export scores nothing: a reward plugin that cannot be imported (trained elsewhere) does not
    stop it; an evaluation, which scores, still says so in one line."""
    recipe = loop_recipe(tmp_path, tiny_pipeline)
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    saved = checkpoint.find_latest(engine.run_dir) / "recipe.yaml"
    data = yaml.safe_load(saved.read_text())
    data["reward"] = "package_on_another_machine.rewards:score"
    saved.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["eval", str(engine.run_dir), "--num-samples", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: reward: cannot import module"), err
