"""DiffusionNFT as LOOP's ``objective: nft``: the loss against a hand computation and against plain
flow-matching regression, the old policy's sampling and decay schedule, the KL to the base as the
official code defines it, LoRA and full fine-tuning, EMA, resume, export and the one-line refusals."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import objectives  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.errors import RecipeError  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop import loop_recipe, tiny_pipeline  # noqa: E402,F401
from tests.test_loop_flow import flow_recipe, sd3_pipeline  # noqa: E402,F401


def _inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 2, 4, 4, generator=g), torch.randn(b, 2, 4, 4, generator=g)
    t = torch.tensor([0.9, 0.5, 0.1][:b])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v, v_old = torch.randn(b, 2, 4, 4, generator=g), torch.randn(b, 2, 4, 4, generator=g)
    return v, v_old, x0, x_t, t, eps


def test_nft_loss_by_hand():
    v, v_old, x0, x_t, t, _ = _inputs()
    adv = torch.tensor([4.0, -7.0, 0.0])
    r = objectives.nft_optimality(adv, 5.0)
    assert r.tolist() == pytest.approx([0.9, 0.0, 0.5])
    beta = 0.3
    total = 0.0
    for b in range(3):  # one sample at a time, the paper's formulas written out
        pos = beta * v[b] + (1 - beta) * v_old[b]
        neg = (1 + beta) * v_old[b] - beta * v[b]
        e_pos, e_neg = x_t[b] - t[b] * pos - x0[b], x_t[b] - t[b] * neg - x0[b]
        l_pos = (e_pos**2).mean() / e_pos.abs().mean()
        l_neg = (e_neg**2).mean() / e_neg.abs().mean()
        total += (r[b] * l_pos + (1 - r[b]) * l_neg) / beta
    loss = objectives.nft_loss(v, v_old, x0, x_t, t, r, beta, adaptive=True, scale=5.0)
    torch.testing.assert_close(loss.float(), 5.0 * total / 3)


def test_nft_at_mix_one_without_weighting_and_r_one_is_flow_matching_regression():
    v, v_old, x0, x_t, t, eps = _inputs(1)
    v.requires_grad_(True)
    loss = objectives.nft_loss(v, v_old, x0, x_t, t, torch.ones(3), 1.0, adaptive=False)
    # x̂0 = x_t − t·v, so (x̂0 − x0)² = t²·(v − (ε − x0))²: the flow-matching regression toward ε − x0 in x0 space
    regression = (t.view(-1, 1, 1, 1) ** 2 * (v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss.float(), regression)
    (grad,) = torch.autograd.grad(loss, v)
    (expected,) = torch.autograd.grad(regression, v)
    torch.testing.assert_close(grad.float(), expected)
    assert not torch.is_tensor(v_old.grad)  # the old policy takes no gradient


def _nft_recipe(tmp_path, pipeline, **loop):
    recipe = flow_recipe(tmp_path, pipeline, objective="nft", guidance_scale=1.0, advantage="group_norm", **loop)
    recipe["optim"]["lr"] = 5e-2
    return recipe


def test_nft_trains_samples_with_the_old_policy_and_decays_it(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = _nft_recipe(tmp_path, sd3_pipeline, nft={"old_decay_rate": 0.2, "old_decay_max": 0.5})
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.5}]
    recipe["run"].update(iterations=3)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert algo.steps_per_sample == 4  # every noise level of the 4-step schedule, not an SDE window
    snapshots, after, olds = [], algo.after_update, []

    def recording():
        snapshots.append({n: p.detach().clone() for n, p in algo._trained_parameters().items()})
        olds.append({n: p.clone() for n, p in algo.nft_old.items()})
        after()

    algo.after_update = recording
    stats = engine.fit()
    for key in ("loss/policy", "policy/old_deviation", "penalty/0.kl_ref", "reward/mean"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    # 2 minibatches a round: d = min(0.2·steps, 0.5) after 2, 4, 6 optimizer steps
    for n, d in enumerate((0.4, 0.5, 0.5)):
        for name, old in olds[n].items():
            expected = d * old + (1 - d) * snapshots[n][name]
            after_n = olds[n + 1][name] if n + 1 < len(olds) else algo.nft_old[name]
            torch.testing.assert_close(after_n, expected)
    assert any(not torch.equal(algo.nft_old[n], p) for n, p in algo._trained_parameters().items())
    assert algo.optimizer_steps == 6
    # the collect samples θ_old's ODE: the same noise through θ_old gives its latents, through θ does not
    gen = algo.runtime.generator
    state = gen.get_state()
    cond = algo._embed(["a red one", "a blue two"])
    with torch.no_grad():
        sampled = algo._sample_old(algo.denoiser, cond, None, gen)["latents"][:, -1]
        gen.set_state(state)
        noise = torch.randn((2, 1, *algo.adapter.latent_shape), generator=gen)
        live = algo.adapter.sample_with_noise(algo.denoiser, cond, None, noise, True)
        with algo._swapped_weights(algo.nft_old):
            old = algo.adapter.sample_with_noise(algo.denoiser, cond, None, noise, True)
    torch.testing.assert_close(sampled, old)
    assert not torch.allclose(sampled, live)
    engine.close()


def test_nft_kl_is_the_mean_squared_velocity_difference(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = _nft_recipe(tmp_path, sd3_pipeline)
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 2.0}]
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    engine.fit()
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
    item = next(iter(algo.minibatches(batch, 0)))
    state = algo.runtime.generator.get_state()
    _, stats = algo.loss(item)
    algo.runtime.generator.set_state(state)  # the same fresh noise
    _, idx, step = item
    x0, t = batch.latents[idx, -1], batch.noise_schedule[step]
    eps = torch.randn(x0.shape, generator=algo.runtime.generator)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    cond = {k: v[idx] for k, v in batch.cond.items()}
    with torch.no_grad():
        v = algo.adapter.predict_velocity(algo.denoiser, cond, x_t, t)
        algo.denoiser.disable_adapters()
        v_ref = algo.adapter.predict_velocity(algo.denoiser, cond, x_t, t)
        algo.denoiser.enable_adapters()
    kl = ((v - v_ref) ** 2).mean()
    assert kl > 0
    torch.testing.assert_close(float(stats["penalty/0.kl_ref"]), 2.0 * float(kl), rtol=1e-4, atol=0)
    engine.close()


def test_nft_full_finetuning_with_ema_trains(tmp_path, sd3_pipeline):  # noqa: F811
    recipe = _nft_recipe(tmp_path, sd3_pipeline, finetune="full", ema_decay=0.5, nft={"ode": False})
    engine = Engine(load_recipe(recipe))
    before = {n: p.detach().clone() for n, p in engine.algo.denoiser.named_parameters()}
    stats = engine.fit()
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))
    moved = [n for n, p in engine.algo.denoiser.named_parameters() if not torch.equal(p, before[n])]
    assert moved and engine.algo.ema is not None and engine.algo.nft_old is not None
    engine.close()


@pytest.mark.slow  # ~30 s on 2 cores: .ci/run runs it after make test
def test_nft_resume_after_sigkill_equals_uninterrupted(tmp_path, sd3_pipeline):  # noqa: F811
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 5

    def make(name):
        recipe = _nft_recipe(tmp_path, sd3_pipeline, timestep_fraction=0.5, ema_decay=0.5)
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("lora" in k for k in weights)


def test_nft_exports_a_lora_stock_diffusers_reads(tmp_path, sd3_pipeline, capsys):  # noqa: F811
    from diffusers import StableDiffusion3Pipeline

    from rlprox.cli import main

    recipe = _nft_recipe(tmp_path, sd3_pipeline)
    engine = Engine(load_recipe(recipe))
    engine.fit()
    run_dir = engine.run_dir
    engine.close()
    assert main(["export", str(run_dir), str(tmp_path / "lora")]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_pipeline), text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora" in n]
    assert loaded and "load_lora_weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flow", "loop", "regularizers", "message"),
    [
        (False, {"objective": "nft", "guidance_scale": 1.0}, [], r"loop\.objective: nft regresses a flow-matching"),
        (True, {"objective": "nft", "guidance_scale": 2.0}, [], r"loop\.guidance_scale: objective nft samples"),
        (True, {"objective": "nft", "guidance_scale": 1.0, "nft": {"mix": 0}}, [], r"loop\.nft\.mix: must be > 0"),
        (
            True,
            {"objective": "nft", "guidance_scale": 1.0},
            [{"type": "kl_ref", "lam": 0.1, "scale": "flow_grpo"}],
            r"regularizers\[0\]\.scale: objective nft has no SDE steps",
        ),
    ],
)
def test_nft_refusals_are_one_line(tmp_path, sd3_pipeline, tiny_pipeline, flow, loop, regularizers, message):  # noqa: F811
    recipe = flow_recipe(tmp_path, sd3_pipeline, **loop) if flow else loop_recipe(tmp_path, tiny_pipeline, **loop)
    recipe["regularizers"] = regularizers
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)
