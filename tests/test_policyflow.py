"""PolicyFlow: the ratio is 1 before the update, the Brownian residual and its
gradients, the ODE sampler, the velocity-difference ratio, resume and recipe errors."""

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator

from rlprox import objectives
from rlprox.cli import main
from rlprox.engine import Engine, make_runtime
from rlprox.models.flow_policy import FlowPolicy
from rlprox.prox.regularizers import Brownian, brownian_residual
from rlprox.recipe import load_recipe


def pf_recipe(tmp_path, **pf):
    return {
        "algo": "policyflow",
        "seed": 4,
        "run": {
            "name": "pf",
            "output_dir": str(tmp_path),
            "iterations": 3,
            "log_with": [],
            "progress": False,
            "plot": False,
        },
        "env": {"id": "rlprox/MultiGoal-v0", "num_envs": 2, "normalize_reward": True},
        "policyflow": {"num_steps": 16, "minibatch_size": 16, "update_epochs": 2, "flow_steps": 4, **pf},
        "regularizers": [{"type": "brownian", "lam": 0.1}],
        "optim": {"lr": 1e-3},
    }


def test_brownian_residual_hand_case_and_gradients():
    v = torch.tensor([[1.0, -2.0]], requires_grad=True)
    v_hat = torch.tensor([[0.5, 1.0]], requires_grad=True)
    x_t = torch.tensor([[0.2, 0.4]])
    t = torch.tensor([0.25])
    eta = brownian_residual(v, v_hat, x_t, t)
    # (1 − t)·v − (x_t − t·v̂) = 0.75·[1, −2] − ([0.2, 0.4] − 0.25·[0.5, 1])
    torch.testing.assert_close(eta, torch.tensor([[0.75 - 0.075, -1.5 - 0.15]]))
    Brownian(lam=0.3).penalty(v=v, v_hat=v_hat, x_t=x_t, t=t).backward()
    assert v_hat.grad is None or torch.count_nonzero(v_hat.grad) == 0  # stop-gradient on v̂
    assert torch.count_nonzero(v.grad) == 2


def test_brownian_residual_with_base_std_uses_the_rescaled_score():
    """z ~ N(0, s²): ∇log p_t(x) = (t·v̂ − x)/((1 − t)·s²), so η = (1 − t)·v − (x − t·v̂)/s²."""
    v, v_hat = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 1.0]])
    x_t, t = torch.tensor([[0.2, 0.4]]), torch.tensor([0.25])
    # s = 0.5: 0.75·[1, −2] − [0.075, 0.15] / 0.25
    expected = torch.tensor([[0.75 - 0.3, -1.5 - 0.6]])
    torch.testing.assert_close(brownian_residual(v, v_hat, x_t, t, base_std=0.5), expected)
    # the closed form against the score of the Gaussian path: a fixed action a, x_t = (1 − t)·z + t·a,
    # p_t(x | a) = N(t·a, (1 − t)²·s²), whose velocity is v̂ = (a − x)/(1 − t)
    s, a, x = 0.3, torch.tensor([[0.7, -0.2]]), torch.tensor([[0.1, 0.05]])
    tt = torch.tensor([0.4])
    score = -(x - tt * a) / ((1 - tt) ** 2 * s**2)
    exact_v_hat = (a - x) / (1 - tt)
    torch.testing.assert_close(
        brownian_residual(v, exact_v_hat, x, tt, base_std=s), (1 - tt) * (v + score), rtol=1e-5, atol=1e-5
    )
    # the regularizer takes s from the loss (PolicyFlow offers policyflow.noise_scale) and
    # averages η² over the batch and the action dimensions
    eta = brownian_residual(v, v_hat, x_t, t, base_std=0.5)
    value = Brownian(lam=2.0).penalty(v=v, v_hat=v_hat, x_t=x_t, t=t, base_std=0.5)
    torch.testing.assert_close(value, 2.0 * eta.pow(2).sum() / 2)
    wide = Brownian(lam=1.0).penalty(v=v.repeat(1, 3), v_hat=v_hat.repeat(1, 3), x_t=x_t.repeat(1, 3), t=t)
    torch.testing.assert_close(wide, Brownian(lam=1.0).penalty(v=v, v_hat=v_hat, x_t=x_t, t=t))


def test_flow_log_ratio_hand_case():
    delta = torch.tensor([[0.5, -1.0]])
    dv = torch.tensor([[0.25, 0.0]])
    log_std = torch.log(torch.tensor([0.5, 2.0]))
    log_std_old = torch.log(torch.tensor([1.0, 1.0]))
    expected = (-0.5 * (0.25 / 0.5) ** 2 - np.log(0.5) + 0.5 * 0.25) + (
        -0.5 * (1.0 / 2.0) ** 2 - np.log(2.0) + 0.5 * 1.0
    )
    assert objectives.flow_log_ratio(delta, dv, log_std, log_std_old).item() == pytest.approx(expected, rel=1e-6)
    assert objectives.flow_log_ratio(delta, torch.zeros_like(dv), log_std_old, log_std_old).item() == 0.0


def test_ode_sampler_step_count_determinism_and_numpy_equals_torch():
    torch.manual_seed(0)
    policy = FlowPolicy(3, 2, last_layer_scale=1.0)
    calls = {"n": 0}
    original = policy.velocity_field

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    policy.velocity_field = counting
    obs, z = torch.randn(5, 3), torch.randn(5, 2)
    phi = policy.flow(obs, z, steps=7)
    assert calls["n"] == 2 * 7  # midpoint: two velocity evaluations per step
    torch.testing.assert_close(phi, policy.flow(obs, z, steps=7))
    snap = policy.snapshot(7)
    np.testing.assert_allclose(snap.flow(obs.numpy(), z.numpy()), phi.numpy(), rtol=1e-4, atol=1e-5)
    a1 = snap.act(obs.numpy(), np.random.default_rng(3))
    a2 = snap.act(obs.numpy(), np.random.default_rng(3))
    for x, y in zip(a1, a2):
        np.testing.assert_array_equal(x, y)
    action, z_np, phi_np, delta, logp, _ = a1
    np.testing.assert_allclose(action, phi_np + delta, rtol=1e-6)
    std = np.exp(snap.log_std)
    np.testing.assert_allclose(
        logp, (-0.5 * (delta / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1), rtol=1e-5
    )
    # the base noise scale: z ~ N(0, s² I), the same draws scaled
    scaled = policy.snapshot(7, noise_scale=0.25).act(obs.numpy(), np.random.default_rng(3))
    np.testing.assert_allclose(scaled[1], 0.25 * z_np, rtol=1e-6)
    np.testing.assert_allclose(scaled[2], snap.flow(obs.numpy(), 0.25 * z_np), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", ["velocity", "fpo"])
def test_ratio_is_one_at_the_first_minibatch(tmp_path, ratio):
    engine = Engine(load_recipe(pf_recipe(tmp_path, ratio=ratio)))
    algo = engine.algo
    with torch.no_grad():
        packed = algo.advantages(algo.collect())
        mb = next(iter(algo.minibatches(packed, 0)))
        _, stats = algo.loss(mb)
    assert float(stats["policy/ratio_max"]) == pytest.approx(1.0, abs=1e-5) and float(stats["policy/approx_kl"]) < 1e-9
    stats = engine.fit()
    engine.close()
    assert np.isfinite(stats["loss/total"]) and stats["penalty/0.brownian"] > 0
    if ratio == "fpo":
        assert not algo.policy.log_std_param.requires_grad


def test_the_loss_gives_the_brownian_term_its_base_noise_scale(tmp_path):
    engine = Engine(load_recipe(pf_recipe(tmp_path, noise_scale=0.3)))
    algo = engine.algo
    with torch.no_grad():
        mb, _ = next(iter(algo.minibatches(algo.advantages(algo.collect()), 0)))
        _, stats = algo.loss((mb, None))
        col = algo.columns
        v = algo.policy(col(mb, "x_t"), col(mb, "t"), col(mb, "obs"))[0]
        eta = brownian_residual(v, col(mb, "v_hat"), col(mb, "x_t"), col(mb, "t"), base_std=0.3)
    engine.close()
    assert float(stats["penalty/0.brownian"]) == pytest.approx(0.1 * float(eta.pow(2).mean()), rel=1e-5)


def test_actor_and_critic_get_separate_learning_rates(tmp_path):
    engine = Engine(load_recipe(pf_recipe(tmp_path, critic_lr=5e-3)))
    lrs = sorted(g["lr"] for g in engine.base_optimizer.param_groups)
    assert lrs == [1e-3, 5e-3]
    critic = {id(p) for p in engine.algo.policy.critic.parameters()}
    for g in engine.base_optimizer.param_groups:
        assert all((id(p) in critic) == (g["lr"] == 5e-3) for p in g["params"])
    engine.close()


def test_brownian_on_a_trainer_that_does_not_offer_its_inputs_is_a_recipe_error(tmp_path, tiny_recipe, capsys):
    recipe = tiny_recipe()
    recipe["regularizers"] = [{"type": "brownian", "lam": 0.1}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "recipe error: regularizers[0]: brownian needs v, v_hat, x_t, t, base_std or v, v_hat, x_t, t "
        "from the loss, which algo ppo does not provide (it offers none)"
    )


def test_policyflow_resume_after_sigkill_equals_uninterrupted(tmp_path):
    from tests.crash import kill_resume_equals_uninterrupted

    def make(name):
        recipe = pf_recipe(tmp_path)
        recipe["run"].update(name=name, iterations=12, save_every=1, keep_last=2)
        return recipe

    kill_resume_equals_uninterrupted(tmp_path, make, 12)


def test_policyflow_eval_reports_goal_metrics(tmp_path, capsys):
    engine = Engine(load_recipe(pf_recipe(tmp_path)))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--episodes", "6"]) == 0
    out = capsys.readouterr().out
    for key in (
        "success_rate",
        "goal0_frac",
        "goal_entropy_normalized",
        "goal_coverage",
        "trajectories",
        "success_return",
        "origin_success_rate",
        "action_modes",
    ):
        assert key in out, key
    fresh = load_recipe(pf_recipe(tmp_path))
    algo = __import__("rlprox.algos.policyflow", fromlist=["PolicyFlow"]).PolicyFlow(
        fresh, make_runtime(Accelerator(cpu=True), 4, train=False)
    )
    assert algo.summarize_eval({"_goal": [0, 0, 1, -1], "return": [1.0, 2.0, 6.0, -9.0]}) == pytest.approx(
        {
            "success_return": 3.0,
            "success_rate": 0.75,
            "goal0_frac": 0.5,
            "goal1_frac": 0.25,
            "goal2_frac": 0.0,
            "goal3_frac": 0.0,
            "goal_entropy": -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)),
            "goal_entropy_normalized": -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)) / np.log(4),
            "goal_coverage": 2.0,
        }
    )


def test_fpo_as_published_options(tmp_path):
    """FPO's code: τ on the K-point grid, the ε-loss (the velocity loss weighted by τ²),
    no Gaussian head (a = φ₁(z))."""
    engine = Engine(
        load_recipe(
            pf_recipe(tmp_path, ratio="fpo", fpo_loss="eps", gaussian_head=False, t_sampling="grid", flow_steps=4)
        )
    )
    algo = engine.algo
    batch = algo.collect()
    np.testing.assert_array_equal(batch["delta"], 0.0)  # no head: the action is φ₁(z)
    packed = algo.advantages(batch)
    tau = algo.columns(packed, "tau")
    assert set(np.unique(tau.numpy()).round(6)) <= {0.0, 0.25, 0.5, 0.75}
    obs, action, eps = algo.columns(packed, "obs"), algo.columns(packed, "action"), algo.columns(packed, "eps")
    B = len(obs)
    eps = eps.reshape(B, -1, algo.action_dim)
    with torch.no_grad():
        weighted = algo._cfm_losses(algo.policy, obs, action, tau, eps)
        algo.cfg.fpo_loss = "velocity"
        plain = algo._cfm_losses(algo.policy, obs, action, tau, eps)
        # ε̂ = x_τ − τ·v against the stored ε, by hand
        x_tau = (1 - tau[..., None]) * eps + tau[..., None] * action[:, None]
        obs_rep = obs.repeat_interleave(8, 0)
        v = algo.policy.velocity_field(x_tau.reshape(-1, algo.action_dim), tau.reshape(-1), obs_rep)
        eps_hat = x_tau - tau[..., None] * v.reshape(eps.shape)
    torch.testing.assert_close(weighted, tau.pow(2) * plain)
    torch.testing.assert_close(weighted, (eps_hat - eps).pow(2).mean(-1), rtol=1e-4, atol=1e-6)
    engine.close()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"gaussian_head": False}, "policyflow.gaussian_head: false needs ratio: fpo"),
        ({"ratio": "fpo", "gaussian_head": False, "ent_coef": 0.01}, "policyflow.ent_coef: must be 0 without"),
        ({"fpo_loss": "eps"}, "policyflow.fpo_loss: applies to ratio: fpo only"),
    ],
)
def test_fpo_options_outside_fpo_are_recipe_errors(tmp_path, capsys, fields, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(pf_recipe(tmp_path, **fields)))
    assert main(["train", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_tiny_run_reproduces_its_recorded_numbers(tmp_path):
    """The final stats of a tiny MultiGoal run, recorded before PPO and PolicyFlow moved
    their env side into ``rlprox.onpolicy.OnPolicyEnv``: a refactor keeps them; a change
    of the rollout, the RNG streams' order or the loss moves them (then re-record)."""
    recipe = pf_recipe(tmp_path)
    recipe["run"]["eval_size"] = 3
    engine = Engine(load_recipe(recipe))
    stats = engine.fit()
    engine.close()
    recorded = {
        "loss/total": 0.3048996031284332,
        "policy/approx_kl": 0.0002769471611827612,
        "value/explained_variance": 0.1743585467338562,
        "reward/episodic_return": -1409.205460894985,
        "eval/return": -1147.5394893640025,
        "penalty/0.brownian": 0.10771030187606812,
    }
    assert {key: stats[key] for key in recorded} == pytest.approx(recorded, rel=1e-5)


def test_brownian_reduction_mean_is_the_released_code_and_sum_the_papers_norm(tmp_path, capsys):
    """reduction mean = F.mse_loss over batch and action dims (the released code, where w_b 0.25 was
    tuned); sum = the squared norm over the A action dims, averaged over the batch (the paper's
    formula): A times the mean. sum trains; any other reduction is a one-line recipe error."""
    from rlprox.cli import main

    g = torch.Generator().manual_seed(0)
    v, v_hat, x_t, t = (torch.randn(5, 3, generator=g) for _ in range(4))
    t = t[:, 0].sigmoid()
    eta2 = brownian_residual(v, v_hat, x_t, t).pow(2)
    mean, total = Brownian(0.25, "mean"), Brownian(0.25, "sum")
    torch.testing.assert_close(
        mean.penalty(v=v, v_hat=v_hat, x_t=x_t, t=t),
        0.25 * torch.nn.functional.mse_loss((1 - t[:, None]) * v, x_t - t[:, None] * v_hat, reduction="mean"),
    )
    torch.testing.assert_close(total.penalty(v=v, v_hat=v_hat, x_t=x_t, t=t), 0.25 * eta2.sum(-1).mean())
    recipe = pf_recipe(tmp_path, t_sampling="midpoint_grid")
    recipe["regularizers"] = [{"type": "brownian", "lam": 0.25, "reduction": "sum"}]
    engine = Engine(load_recipe(recipe))
    times = engine.algo._flow_times((4000,))
    assert set(np.unique(times * 8).round().astype(int).tolist()) == set(range(9))  # {j / 2K}, K = 4: 0 .. 1
    stats = engine.fit()
    engine.close()
    assert np.isfinite(stats["loss/total"]) and stats["penalty/0.brownian"] > 0
    recipe["regularizers"][0]["reduction"] = "median"
    recipe["run"]["name"] = "median"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["recipe error: regularizers[0]: regularizer field 'reduction' must be mean or sum (got 'median')"]
