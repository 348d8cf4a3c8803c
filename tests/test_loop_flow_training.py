"""LOOP's training options on a tiny StableDiffusion3Pipeline: the KL to the reference
(kl_ref on the flow step's means), the EMA of the trained weights, gradient checkpointing,
zero-spread reward groups, a bf16 LoRA base, bf16 autocast ratios, full fine-tuning, and a
missing pipeline component."""

import shutil

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import checkpoint, objectives  # noqa: E402
from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop_flow import flow_recipe, sd3_pipeline  # noqa: E402,F401


def _first_item(algo):
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    return next(iter(algo.minibatches(batch, 0)))


def _step_distribution(algo, model, item):
    batch, idx, step = item
    return algo.adapter.step_distribution(
        model,
        {k: v[idx] for k, v in batch.cond.items()},
        algo._negative(len(idx)),
        batch.noise_schedule,
        batch.latents[idx, step],
        batch.latents[idx, step + 1],
        step,
    )


def test_gaussian_mean_kl_is_the_kl_of_two_gaussians_per_element():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.5, 1.2]).view(3, 1, 1, 1)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    )
    torch.testing.assert_close(objectives.gaussian_mean_kl(mean, ref, std), exact.mean())
    assert objectives.gaussian_mean_kl(mean, mean, 0.1) == 0


def test_kl_ref_on_the_flow_step_is_the_distance_to_the_lora_off_model(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, clip_coef=10.0)
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.5}]
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.needs_reference
    _, stats = algo.loss(_first_item(algo))
    assert float(stats["penalty/0.kl_ref"]) == 0  # LoRA's B starts at 0: the policy is the reference
    engine.fit()
    item = _first_item(algo)
    with_kl, stats = algo.loss(item)
    logp, mean, std = _step_distribution(algo, algo.denoiser, item)
    batch, idx, step = item
    without, _ = objectives.clipped_surrogate(logp, batch.log_probs[idx, step], batch.advantages[idx], 10.0)
    with torch.no_grad():
        algo.denoiser.disable_adapters()
        _, ref_mean, _ = _step_distribution(algo, algo.denoiser, item)
        algo.denoiser.enable_adapters()
    kl = objectives.gaussian_mean_kl(mean, ref_mean, std).detach()
    assert kl > 0
    torch.testing.assert_close(float(stats["penalty/0.kl_ref"]), 0.5 * float(kl), rtol=1e-5, atol=0)
    torch.testing.assert_close(with_kl.detach(), (without + 0.5 * kl).detach())
    engine.close()


def test_kl_ref_is_refused_by_a_trainer_whose_loss_offers_neither_form(tmp_path):
    from rlprox.errors import RecipeError

    recipe = {"algo": "ppo", "env": {"id": "CartPole-v1"}, "regularizers": [{"type": "kl_ref", "lam": 1}]}
    with pytest.raises(RecipeError, match=r"regularizers\[0\]: kl_ref needs mean, ref_mean, std or logp, ref_logp"):
        load_recipe(recipe)


def test_ema_follows_the_updates_is_used_for_eval_and_export_and_resumes(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, ema_decay=0.6, clip_coef=10.0)
    recipe["optim"]["lr"] = 5e-2
    recipe["run"].update(iterations=3, save_every=1)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    snapshots, after = [], algo.after_update

    def recording():
        snapshots.append({n: p.detach().clone() for n, p in algo._trained_parameters().items()})
        after()

    algo.after_update = recording
    engine.fit()
    assert len(snapshots) == 3
    expected = dict(snapshots[0])
    for n, snap in enumerate(snapshots[1:], start=1):
        d = min(0.6, (1 + n) / (10 + n))
        expected = {k: d * v + (1 - d) * snap[k] for k, v in expected.items()}
    for name, value in expected.items():
        torch.testing.assert_close(algo.ema[name], value)
    live = {n: p.detach().clone() for n, p in algo._trained_parameters().items()}
    assert any(not torch.equal(live[n], algo.ema[n]) for n in live)
    with algo._tuned_model() as model:
        inside = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in live:
        assert torch.equal(inside[name], algo.ema[name])  # evaluation samples the EMA weights
        assert torch.equal(algo._trained_parameters()[name], live[name])  # and the live ones come back
    exported = {}
    algo.adapter.save_lora = lambda out, model: exported.update(
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    )
    algo.export(tmp_path / "export")
    assert all(torch.equal(exported[n], algo.ema[n]) for n in live)
    ema = {n: t.clone() for n, t in algo.ema.items()}
    engine.close()
    recipe["run"]["resume"] = "auto"
    resumed = Engine(load_recipe(recipe))
    resumed.resume()
    assert resumed.algo.ema_updates == 3 and all(torch.equal(resumed.algo.ema[n], ema[n]) for n in ema)
    resumed.close()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, sd3_pipeline):  # noqa: F811
    grads = []
    for on in (False, True):
        engine = Engine(load_recipe(flow_recipe(tmp_path / str(on), sd3_pipeline, gradient_checkpointing=on)))
        algo = engine.algo
        assert algo.denoiser.is_gradient_checkpointing == on
        algo.denoiser.train()
        loss, _ = algo.loss(_first_item(algo))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in algo.denoiser.named_parameters() if p.grad is not None})
        engine.close()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g)


@pytest.mark.parametrize("advantage", ["loo", "group_norm"])
def test_groups_without_reward_spread_carry_zero_advantage_and_are_counted(tmp_path, sd3_pipeline, advantage):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, advantage=advantage, normalize_advantages=True)
    recipe["reward"] = "tests.reward_plugins:constant"  # 0.1 everywhere: 0.1 − mean(0.1, 0.1, 0.1) ≠ 0 in floats
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    assert torch.equal(batch.advantages, torch.zeros_like(batch.advantages))
    assert algo.iteration_stats(batch, 1.0)["reward/zero_std_groups"] == recipe["loop"]["prompts_per_iteration"]
    spread = algo._zero_spread(torch.tensor([0.3, 0.3, 0.2, 0.4, 0.2, float("nan")]))
    assert spread.tolist() == [True, False, True]  # one finite reward: no spread either
    engine.close()


def test_lora_over_a_bf16_base_trains_fp32_adapters_and_moves_only_them(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline)
    recipe["run"].update(frozen_dtype="bfloat16", mixed_precision="bf16")
    engine = Engine(load_recipe(recipe))
    transformer = engine.algo.denoiser
    dtypes = {n: p.dtype for n, p in transformer.named_parameters()}
    assert all(d == (torch.float32 if "lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    stats = engine.fit()
    engine.close()
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))
    moved = {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)


def test_bf16_autocast_ratio_at_the_first_minibatch(tmp_path, sd3_pipeline):  # noqa: F811
    """Under bf16 autocast the stored log-probs are recomputed in a different batch shape: the
    ratio is 1 up to bf16's rounding of the velocity. Measured: max |ρ − 1| printed below
    (fp32: exactly 1, test_loop_flow)."""
    recipe = flow_recipe(tmp_path, sd3_pipeline)
    recipe["run"]["mixed_precision"] = "bf16"
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        deviations = []
        for item in algo.minibatches(batch, 0):
            with engine.accelerator.autocast():
                _, stats = algo.loss(item)
            deviations.append(abs(float(stats["policy/ratio_max"]) - 1))
        with engine.accelerator.autocast():  # the velocity really is computed in bf16
            x, cond = batch.latents[:2, 0], {k: v[:2] for k, v in batch.cond.items()}
            v = algo.adapter._velocity(algo.denoiser, cond, algo._negative(2))(x, torch.ones(2))
        assert v.dtype == torch.bfloat16
    engine.close()
    print(f"bf16 autocast: max |ratio - 1| at the first minibatch = {max(deviations):.2e}")
    assert max(deviations) < 0.05


def test_full_finetuning_with_bf16_frozen_encoders(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, finetune="full")
    recipe["run"].update(frozen_dtype="bfloat16", mixed_precision="bf16")
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    before = {n: p.detach().clone() for n, p in algo.denoiser.named_parameters()}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in algo.denoiser.parameters())
    engine.fit()
    engine.close()
    assert next(algo.frozen["text_encoder"].parameters()).dtype == torch.bfloat16
    moved = [n for n, p in algo.denoiser.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_a_missing_pipeline_component_is_one_line(tmp_path, sd3_pipeline, capsys, component):  # noqa: F811
    broken = tmp_path / "broken-sd3"
    shutil.copytree(sd3_pipeline, broken)
    shutil.rmtree(broken / component)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(flow_recipe(tmp_path, broken)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: loop.pipeline: cannot load"), err
    assert checkpoint.find_latest(tmp_path / "l") is None


def test_resolution_sets_the_latent_size_and_a_bad_one_is_one_line(tmp_path, sd3_pipeline, capsys):  # noqa: F811
    engine = Engine(load_recipe(flow_recipe(tmp_path, sd3_pipeline, resolution=24)))
    with torch.no_grad():
        batch = engine.algo.collect()
    assert batch.latents.shape[-2:] == (12, 12)  # 24 px over the VAE's factor 2
    assert engine.algo.adapter.decode(batch.latents[:1, -1]).shape[-2:] == (24, 24)
    engine.close()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(flow_recipe(tmp_path, sd3_pipeline, resolution=26)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["recipe error: loop.resolution: 26 px is not a multiple of 4 (the VAE's factor 2 × patch size 2)"]


def test_a_flow_run_prints_no_library_noise(tmp_path, sd3_pipeline):  # noqa: F811
    """Loading an SD3 pipeline (its processors import without torchvision) through the CLI."""
    from tests.test_loop import _cli_train

    out = _cli_train(tmp_path, flow_recipe(tmp_path, sd3_pipeline))
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr and "float32" not in out.stderr, out.stderr


def test_steps_per_pass_gives_the_same_update_in_fewer_passes(tmp_path, sd3_pipeline, capsys):  # noqa: F811
    params = []
    for k in (1, 2):
        recipe = flow_recipe(tmp_path / str(k), sd3_pipeline, steps_per_pass=k, clip_coef=10.0)
        recipe["optim"] = {"name": "sgd", "lr": 0.5, "max_grad_norm": 0.0}
        recipe["run"]["iterations"] = 1
        engine = Engine(load_recipe(recipe))
        calls, loss = [], engine.algo.loss
        engine.algo.loss = lambda item: calls.append(len(item.samples)) or loss(item)
        engine.fit()
        engine.close()
        assert calls == [2 * k] * (2 * 4 // k)  # 2 minibatches of 2 samples × 4 steps, k steps per pass
        params.append({n: p.detach().clone() for n, p in engine.algo.denoiser.named_parameters() if "lora" in n})
    assert any(not torch.equal(v, params[0][n]) for n, v in params[1].items())  # not the same computation...
    for name, value in params[0].items():
        torch.testing.assert_close(params[1][name], value, rtol=1e-4, atol=1e-6)  # ...but the same update
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(flow_recipe(tmp_path, sd3_pipeline, steps_per_pass=3)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "recipe error: loop.steps_per_pass: 3 does not divide the 4 steps trained per sample "
        "(the sde_window's steps × timestep_fraction)"
    ]
