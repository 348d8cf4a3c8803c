"""Flow-GRPO-Fast / MixGRPO in LOOP's flow-matching families: a random SDE window per sampling
batch (sampling.sde_window_size, sde_window_range) and one initial noise per prompt group
(loop.shared_initial_noise): a group shares its ODE path up to the window and branches inside it,
only the window's steps carry log-probs and train, and a resumed run draws the same windows."""

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox.engine import Engine  # noqa: E402
from rlprox.errors import RecipeError  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop import loop_recipe, tiny_pipeline  # noqa: E402,F401
from tests.test_loop_flow import (  # noqa: E402,F401
    assert_first_minibatches_recompute_the_stored_log_probs,
    flow_recipe,
    sd3_pipeline,
)

ROOT = Path(__file__).resolve().parent.parent


def fast_recipe(tmp_path, pipeline, sampling=None, **loop):
    """A tiny flow recipe (4 steps, K = 2) with a random 2-step window in [0, 3) and shared initial noise."""
    loop.setdefault("shared_initial_noise", True)
    recipe = flow_recipe(tmp_path, pipeline, **loop)
    recipe["loop"]["sampling"].update({"sde_window_size": 2, "sde_window_range": [0, 3], **(sampling or {})})
    return recipe


def _collect(recipe, name="l"):
    recipe["run"]["name"] = name
    engine = Engine(load_recipe(recipe))
    with torch.no_grad():
        batch = engine.algo.collect()
    return engine, batch


def test_a_group_shares_its_path_up_to_the_window_and_branches_in_it(tmp_path, sd3_pipeline):  # noqa: F811
    engine, batch = _collect(fast_recipe(tmp_path, sd3_pipeline, prompts_per_iteration=4))
    engine.close()
    T, K = 4, 2
    assert batch.trained_steps.shape == (8, 2) and batch.log_probs.shape == (8, T)
    for g in range(4):
        a, b = 2 * g, 2 * g + 1
        start = int(batch.trained_steps[a, 0])
        assert batch.trained_steps[a].tolist() == batch.trained_steps[b].tolist() == [start, start + 1]
        # identical up to the window's start (x_T, then ODE steps), different from its first SDE step on
        assert torch.equal(batch.latents[a, : start + 1], batch.latents[b, : start + 1])
        for k in range(start + 1, T + 1):
            assert not torch.allclose(batch.latents[a, k], batch.latents[b, k])
    x_T = batch.latents[::K, 0]
    assert not torch.allclose(x_T[0], x_T[1])  # each group has its own x_T
    # only the window's steps carry a log-prob
    inside = torch.zeros_like(batch.log_probs, dtype=torch.bool).scatter_(1, batch.trained_steps, True)
    assert (batch.log_probs[~inside] == 0).all() and (batch.log_probs[inside] != 0).all()


def test_the_window_varies_across_sampling_batches_and_repeats_under_a_seed(tmp_path, sd3_pipeline):  # noqa: F811
    # one group per sampling batch: 4 windows per round
    recipe = fast_recipe(tmp_path, sd3_pipeline, prompts_per_iteration=4, sample_batch_size=2)
    engine, first = _collect(recipe, "a")
    with torch.no_grad():
        second = engine.algo.collect()
    engine.close()
    starts = []
    for batch in (first, second):
        for s in range(0, 8, 2):
            rows = batch.trained_steps[s : s + 2]
            assert (rows == rows[0]).all()  # one window per sampling batch
            starts.append(int(rows[0, 0]))
    assert set(starts) <= {0, 1} and len(set(starts)) == 2  # start uniform in [lo, hi − size] = [0, 1]
    again, repeat = _collect(recipe, "b")  # the same seed: the same windows and samples
    again.close()
    assert torch.equal(repeat.trained_steps, first.trained_steps) and torch.equal(repeat.latents, first.latents)


@pytest.mark.parametrize(("subset", "fraction"), [("random", 0.5), ("first", 1.0)])
def test_minibatches_train_each_samples_window_and_recompute_its_log_probs(
    tmp_path,
    sd3_pipeline,  # noqa: F811
    subset,
    fraction,
):
    recipe = fast_recipe(tmp_path, sd3_pipeline, prompts_per_iteration=4, sample_batch_size=2, timestep_subset=subset)
    recipe["loop"]["timestep_fraction"] = fraction
    recipe["loop"]["sampling"]["sde_window_range"] = [0, 4]  # starts 0, 1, 2
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.adapter.trained_steps.tolist() == [0, 1]  # one window: its size is the count per sample
    assert algo.steps_per_sample == int(2 * fraction)
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        items = list(algo.minibatches(batch, 0))
        assert len(items) == 4 * algo.micro_steps
        for i, item in enumerate(items):
            own = batch.trained_steps[item.samples]  # (b, 2)
            assert (item.step[:, None] == own).any(1).all()  # each step lies in its sample's window
            if subset == "first":  # the window's steps in order
                assert torch.equal(item.step, own[:, i % algo.micro_steps])
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    engine.close()


def test_fixed_windows_keep_no_per_sample_steps(tmp_path, sd3_pipeline):  # noqa: F811
    engine, batch = _collect(flow_recipe(tmp_path, sd3_pipeline, sde_window=[1, 3]))
    engine.close()
    assert batch.trained_steps is None and engine.algo.adapter.sde_window == (1, 3)


def test_the_range_defaults_to_the_first_half_and_evaluation_takes_its_first_window(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = fast_recipe(tmp_path, sd3_pipeline, shared_initial_noise=False)
    del recipe["loop"]["sampling"]["sde_window_range"]
    engine = Engine(load_recipe(recipe))
    options = engine.algo.adapter.options
    assert options.sde_window_range == [0, 2] and options.sde_window is None  # num_steps // 2 = 2
    assert engine.algo.adapter.sde_window == (0, 2)
    engine.close()


def test_the_recipe_trains_one_round_on_the_tiny_sd3(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = yaml.safe_load((ROOT / "recipes/loop/digits-sd3-grpo-fast.yaml").read_text())
    assert recipe["loop"]["shared_initial_noise"] and recipe["loop"]["sampling"]["sde_window_size"] == 2
    recipe["loop"].update(
        pipeline=str(sd3_pipeline),
        num_steps=4,
        num_samples_per_prompt=2,
        prompts_per_iteration=2,
        sample_batch_size=4,
        minibatch_size=2,
        max_sequence_length=8,
    )
    recipe["loop"]["sampling"]["sde_window_range"] = [0, 3]
    recipe["run"] = {
        "name": "fast",
        "output_dir": str(tmp_path),
        "iterations": 1,
        "eval_size": 2,
        "log_with": [],
        "progress": False,
        "plot": False,
    }
    engine = Engine(load_recipe(recipe))
    assert engine.algo.steps_per_sample == 2
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "loss/policy", "policy/ratio_max", "penalty/0.kl_ref", "eval/reward_ode"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key


@pytest.mark.slow  # ~30 s on 2 cores: .ci/run runs it after make test
def test_resume_after_sigkill_equals_uninterrupted_with_a_random_window(tmp_path, sd3_pipeline):  # noqa: F811
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 6

    def make(name):
        recipe = fast_recipe(tmp_path, sd3_pipeline, sample_batch_size=2, advantage="group_norm")
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("lora" in k for k in weights)


@pytest.mark.parametrize(
    ("sampling", "loop", "message"),
    [
        ({"sde_window": [0, 2]}, {}, r"loop\.sampling\.sde_window_size: draws a window per sampling batch; sde_"),
        ({"sde_window_size": 0}, {}, r"loop\.sampling\.sde_window_size: must be >= 1 \(got 0\)"),
        ({"sde_window_range": [2, 9]}, {}, r"loop\.sampling\.sde_window_range: must be steps \[lo, hi\) with 0 <= lo"),
        ({"sde_window_range": [2, 2]}, {}, r"loop\.sampling\.sde_window_range: must be steps \[lo, hi\)"),
        ({"sde_window_size": 4}, {}, r"loop\.sampling\.sde_window_size: 4 steps do not fit in .*\[0, 3\] \(3 steps\)"),
        (
            {"sampler": "cps", "noise_level": 0.5, "sde_window_range": [0, 4]},
            {},
            r"loop\.sampling\.sde_window_range: sampler cps cannot sample the last step",
        ),
        ({}, {"objective": "nft", "guidance_scale": 1.0}, r"loop\.shared_initial_noise: objective nft samples"),
    ],
)
def test_bad_fast_options_are_one_line(tmp_path, sd3_pipeline, sampling, loop, message):  # noqa: F811
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(fast_recipe(tmp_path, sd3_pipeline, sampling=sampling, **loop))
    assert len(str(err.value).splitlines()) == 1


def test_a_range_without_a_size_and_a_default_range_too_short_are_one_line(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline)
    recipe["loop"]["sampling"]["sde_window_range"] = [0, 2]
    with pytest.raises(RecipeError, match=r"loop\.sampling\.sde_window_range: is the range of a random window") as err:
        load_recipe(recipe)
    assert len(str(err.value).splitlines()) == 1
    recipe = fast_recipe(tmp_path, sd3_pipeline, sampling={"sde_window_size": 3})
    del recipe["loop"]["sampling"]["sde_window_range"]  # [0, num_steps // 2] = [0, 2]
    with pytest.raises(RecipeError, match=r"loop\.sampling\.sde_window_size: 3 steps do not fit in .*\[0, 2\]"):
        load_recipe(recipe)


def test_shared_noise_is_refused_on_ddim_steps(tmp_path, tiny_pipeline):  # noqa: F811
    with pytest.raises(RecipeError, match=r"loop\.shared_initial_noise: a group shares its path up to") as err:
        load_recipe(loop_recipe(tmp_path, tiny_pipeline, shared_initial_noise=True))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(RecipeError, match=r"loop\.sampling\.sde_window_size: not an option of StableDiffusion"):
        load_recipe(loop_recipe(tmp_path, tiny_pipeline, sampling={"sde_window_size": 2}))
