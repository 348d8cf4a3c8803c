"""Flow-GRPO's options in LOOP: the KL scale of its training script (kl_ref scale: flow_grpo),
its step count and order (int(T·f), the first steps), group means over the batch's std
(advantage_std: batch) and samples with zero advantage left out of the update."""

import dataclasses
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import objectives  # noqa: E402
from rlprox.algos.loop import trained_timesteps  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.errors import RecipeError  # noqa: E402
from rlprox.models import flow_match  # noqa: E402
from rlprox.prox.regularizers import KLReference, build_regularizer  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop import loop_recipe, tiny_pipeline  # noqa: E402,F401
from tests.test_loop_flow import flow_recipe, sd3_pipeline  # noqa: E402,F401


def _flow_grpo_kl_by_hand(mean, ref, sigma, sigma_next, a, sigma_1):
    """Flow-GRPO's train_sd3.py KL, written from its formulas: std_dev_t = a·√(σ/(1 − σ')) with
    σ' = σ_1 at σ = 1, then ((μ − μ_ref)²).mean(dims ≥ 1) / (2·std_dev_t²), the batch mean."""
    out = []
    for b in range(mean.shape[0]):
        s, denom = sigma[b], 1 - (sigma_1 if sigma[b] == 1 else sigma[b])
        std_dev_t = a * math.sqrt(s / denom)
        out.append(((mean[b] - ref[b]) ** 2).mean() / (2 * std_dev_t**2))
    return torch.stack(out).mean()


def test_flow_grpo_scale_is_its_formula_and_the_exact_kl_over_minus_dt():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([1.0, 0.6, 0.3])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    a, sigma_1 = 0.7, 0.9
    fg_std = flow_match.flow_grpo_std("sde", sigma, sigma_next, a, sigma_1, mean)
    flow_grpo = KLReference(1.0, scale="flow_grpo").value(mean=mean, ref_mean=ref, flow_grpo_std=fg_std)
    torch.testing.assert_close(flow_grpo, _flow_grpo_kl_by_hand(mean, ref, sigma, sigma_next, a, sigma_1))
    # the exact KL divides by the step's own std, std_dev_t·√(−dt) away from σ = 1: per sample, flow_grpo × 1/(−dt)
    _, step_std = flow_match.step_moments("sde", torch.zeros_like(mean), mean, sigma, sigma_next, a)
    for b in (1, 2):
        exact = KLReference(1.0).value(mean=mean[b : b + 1], ref_mean=ref[b : b + 1], std=step_std[b : b + 1])
        scaled = KLReference(1.0, scale="flow_grpo").value(
            mean=mean[b : b + 1], ref_mean=ref[b : b + 1], flow_grpo_std=fg_std[b : b + 1]
        )
        torch.testing.assert_close(exact / scaled, torch.tensor(1 / float(sigma[b] - sigma_next[b])))
    # on a CPS step the two agree
    cps_next = torch.tensor([0.4, 0.1])
    cps_std = flow_match.flow_grpo_std("cps", sigma[1:], cps_next, a, sigma_1, mean[1:])
    _, own = flow_match.step_moments("cps", torch.zeros_like(mean[1:]), mean[1:], sigma[1:], cps_next, a)
    torch.testing.assert_close(cps_std, torch.as_tensor(own, dtype=torch.float32).expand_as(cps_std))


def test_a_bad_scale_and_a_trainer_without_flow_steps_are_one_line(tmp_path, tiny_pipeline):  # noqa: F811
    with pytest.raises(ValueError, match="regularizer field 'scale' must be exact or flow_grpo"):
        build_regularizer({"type": "kl_ref", "lam": 1, "scale": "grpo"})
    recipe = loop_recipe(tmp_path, tiny_pipeline)  # an SD-1.5-class pipeline: DDIM steps
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.04, "scale": "flow_grpo"}]
    with pytest.raises(RecipeError, match=r"regularizers\[0\]\.scale: flow_grpo rescales .* \(use scale exact\)"):
        load_recipe(recipe)
    ppo = {"algo": "ppo", "env": {"id": "CartPole-v1"}, "regularizers": [{"type": "kl_ref", "scale": "flow_grpo"}]}
    with pytest.raises(RecipeError, match=r"regularizers\[0\]: kl_ref needs mean, ref_mean, flow_grpo_std"):
        load_recipe(ppo)


def test_kl_ref_flow_grpo_scale_in_the_loss(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, clip_coef=10.0)
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.5, "scale": "flow_grpo"}]
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.needs_reference and algo.needs_flow_grpo_std
    engine.fit()
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    item = next(iter(algo.minibatches(batch, 0)))
    _, stats = algo.loss(item)
    _, idx, step = item
    cond, neg = {k: v[idx] for k, v in batch.cond.items()}, algo._negative(len(idx))
    args = (batch.noise_schedule, batch.latents[idx, step], batch.latents[idx, step + 1], step)
    with torch.no_grad():
        _, mean, std = algo.adapter.step_distribution(algo.denoiser, cond, neg, *args)
        algo.denoiser.disable_adapters()
        _, ref, _ = algo.adapter.step_distribution(algo.denoiser, cond, neg, *args)
        algo.denoiser.enable_adapters()
    sigmas = batch.noise_schedule
    by_hand = _flow_grpo_kl_by_hand(mean, ref, sigmas[step].tolist(), sigmas[step + 1].tolist(), 0.7, float(sigmas[1]))
    assert by_hand > 0
    torch.testing.assert_close(float(stats["penalty/0.kl_ref"]), 0.5 * float(by_hand), rtol=1e-4, atol=0)
    assert float(objectives.gaussian_mean_kl(mean, ref, std)) > float(by_hand)  # the exact KL is the larger
    engine.close()


def test_int_steps_and_the_first_steps_in_order(tmp_path, sd3_pipeline):  # noqa: F811
    assert trained_timesteps(10, 0.99) == 9 and trained_timesteps(20, 0.5) == 10 and trained_timesteps(3, 0.1) == 1
    recipe = flow_recipe(tmp_path, sd3_pipeline, timestep_fraction=0.8, timestep_subset="first")
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.steps_per_sample == 3  # int(4 × 0.8)
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    items = list(algo.minibatches(batch, 0))
    assert len(items) == 2 * 3  # 2 minibatches × 3 steps
    assert [int(item.step[0]) for item in items] == [0, 1, 2, 0, 1, 2]
    assert all(bool((item.step == item.step[0]).all()) for item in items)
    engine.close()


def test_group_means_over_the_batch_std(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, advantage="group_norm", advantage_std="batch")
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.collect()
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.2])
    batch = algo.advantages(dataclasses.replace(batch, rewards=rewards))
    groups = rewards.view(2, 2)
    expected = ((groups - groups.mean(1, keepdim=True)) / (rewards.std() + 1e-4)).view(-1)
    torch.testing.assert_close(batch.advantages, expected)
    assert batch.advantages[2:].eq(0).all()  # the second group has no spread
    engine.close()


def test_zero_advantage_samples_leave_the_update_and_are_counted(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, drop_zero_advantage=True, prompts_per_iteration=4)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.collect()
    # 8 samples, minibatch 2 → 4 minibatches; groups 2 and 4 have no spread: 4 non-zero advantages
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.3, 0.9, 0.2, 0.4, 0.4])
    batch = algo.advantages(dataclasses.replace(batch, rewards=rewards))
    assert int((batch.advantages != 0).sum()) == 4
    items = list(algo.minibatches(batch, 0))
    samples = torch.cat([item.samples for item in items[:: algo.micro_steps]])
    assert len(items) == 4 * algo.micro_steps  # as many minibatches as without dropping, one sample each
    assert sorted(samples.tolist()) == [0, 1, 4, 5]
    assert algo.iteration_stats(batch, 1.0)["reward/dropped_zero_adv"] == 4
    # 3 non-zero → padded with one zero-advantage sample to a multiple of the 4 minibatches
    assert algo._kept(torch.tensor([1.0, 0, 0, 2, 0, 3, 0, 0])) == 4
    assert algo._kept(torch.zeros(8)) == 4  # none: one sample a minibatch, every process alike
    stats = engine.fit()
    assert "reward/dropped_zero_adv" in stats
    engine.close()


@pytest.mark.parametrize(
    ("loop", "key"),
    [
        ({"advantage": "loo", "advantage_std": "batch"}, "loop.advantage_std"),
        ({"advantage": "prompt_stats", "drop_zero_advantage": True}, "loop.drop_zero_advantage"),
    ],
)
def test_options_that_do_not_apply_are_one_line(tmp_path, sd3_pipeline, loop, key):  # noqa: F811
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(flow_recipe(tmp_path, sd3_pipeline, **loop))


def test_kl_masked_surrogate_masks_only_steps_that_leave_the_region():
    logp = torch.log(torch.tensor([1.2, 1.2, 0.8, 0.8, 1.2, 0.8]))
    old = torch.zeros(6)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    kl = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.01, 0.01])
    loss, ratio, masked = objectives.kl_masked_surrogate(logp, old, adv, kl, 0.1)
    # beyond δ: A > 0 with ρ > 1 and A < 0 with ρ < 1 move away (masked); the other two move back (kept)
    assert masked.tolist() == [True, False, False, True, False, False]
    kept = ~masked
    torch.testing.assert_close(loss, -(ratio * adv * kept).mean())
    step_kl = objectives.gaussian_step_kl(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.5]).view(2, 1))
    torch.testing.assert_close(step_kl, torch.tensor([0.5, 2.0]))


def test_kl_trust_region_trains_with_the_old_means_and_masks(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, trust_region="kl", kl_threshold=1e-6, update_epochs=2)
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    assert batch.means is not None and batch.means.shape[:2] == batch.log_probs.shape
    item = next(iter(algo.minibatches(batch, 0)))
    _, stats = algo.loss(item)  # before any update: θ = θ_old, every step KL is 0, nothing masked
    assert float(stats["policy/step_kl"]) < 1e-10 and float(stats["policy/masked_frac"]) == 0
    stats = engine.fit()
    assert stats["policy/step_kl"] > 0 and 0 <= stats["policy/masked_frac"] <= 1
    engine.close()


@pytest.mark.parametrize(
    ("loop", "key"),
    [
        ({"trust_region": "kl"}, "loop.kl_threshold"),
        ({"kl_threshold": 0.1}, "loop.kl_threshold"),
        ({"trust_region": "kl", "kl_threshold": 0.1, "objective": "nft", "guidance_scale": 1.0}, "loop.trust_region"),
    ],
)
def test_trust_region_refusals(tmp_path, sd3_pipeline, loop, key):  # noqa: F811
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(flow_recipe(tmp_path, sd3_pipeline, **loop))


def test_kl_trust_region_refused_on_ddim_steps(tmp_path, tiny_pipeline):  # noqa: F811
    with pytest.raises(RecipeError, match=r"loop\.trust_region: kl masks flow-matching"):
        load_recipe(loop_recipe(tmp_path, tiny_pipeline, trust_region="kl", kl_threshold=0.1))
