"""Flow-matching steps: the SDE mean at a → 0 and the ODE step equal diffusers'
FlowMatchEulerDiscreteScheduler.step; log-probs are the averaged Gaussian density of
hand-computed moments; sampling is reproducible and re-evaluation exact."""

import math
import re

import pytest
import torch
from torch.distributions import Normal

diffusers = pytest.importorskip("diffusers")

from rlprox.models.flow_match import (  # noqa: E402
    cps_step_with_logprob,
    ode_step,
    sample_flow_trajectories,
    sde_step_with_logprob,
    sde_window_mask,
)

NUM_STEPS = 10


def flow_scheduler():
    s = diffusers.FlowMatchEulerDiscreteScheduler()  # default config
    s.set_timesteps(NUM_STEPS)
    return s


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hand_logprob(x_next, mean, std):
    """Averaged log N(x_next; mean, std²), float64, from torch.distributions."""
    return Normal(mean.double(), std).log_prob(x_next.double()).mean().item()


def sde_moments_by_hand(x, v, sigma, sigma_next, a, noise_sigma):
    s2 = a**2 * noise_sigma / (1 - noise_sigma)
    dt = sigma_next - sigma
    return x + (v + s2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, math.sqrt(s2 * -dt)


def cps_moments_by_hand(x, v, sigma, sigma_next, a):
    std = sigma_next * math.sin(a * math.pi / 2)
    x0, eps = x - sigma * v, x + (1 - sigma) * v
    return (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * eps, std


# --- agreement with diffusers ---------------------------------------------------------


def test_sde_step_with_tiny_noise_is_the_diffusers_euler_step():
    s = flow_scheduler()
    sigmas = s.sigmas.tolist()
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    for k, t in enumerate(s.timesteps):  # every step, the first one from σ = 1 included
        x, v = randn(2, 4, 8, 8, seed=k), randn(2, 4, 8, 8, seed=100 + k)
        expected = s.step(v, t, x).prev_sample
        g = torch.Generator().manual_seed(k)
        x_next, log_prob = sde_step_with_logprob(v, x, sigmas[k], sigmas[k + 1], 1e-6, generator=g)
        torch.testing.assert_close(x_next, expected, rtol=0, atol=2e-5)
        assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ode_step_equals_diffusers_step_exactly(dtype):
    s = flow_scheduler()
    sigmas = s.sigmas.tolist()
    for k, t in enumerate(s.timesteps):
        x, v = randn(2, 4, 8, 8, seed=k, dtype=dtype), randn(2, 4, 8, 8, seed=100 + k, dtype=dtype)
        expected = s.step(v, t, x).prev_sample
        out = ode_step(v, x, sigmas[k], sigmas[k + 1])
        assert out.dtype == expected.dtype == dtype
        assert torch.equal(out, expected)


# --- hand-computed log-probs ----------------------------------------------------------

X, V, X_NEXT = [0.5, -1.0, 0.25], [0.2, 0.3, -0.4], [0.3, -0.8, 0.1]


@pytest.mark.parametrize(
    "sigma, sigma_next, kw, noise_sigma",
    [
        (0.6, 0.4, {}, 0.6),
        (1.0, 0.889, {}, 0.889),  # default σ = 1 convention: s uses σ_next inside √(σ/(1−σ))
        (1.0, 0.889, {"sigma_max": 0.999}, 0.999),
        (0.6, 0.4, {"sigma_max": 0.5}, 0.5),
    ],
)
def test_sde_logprob_matches_a_hand_computed_gaussian(sigma, sigma_next, kw, noise_sigma):
    a = 0.7
    x, v, x_next = torch.tensor([X]), torch.tensor([V]), torch.tensor([X_NEXT])
    mean, std = sde_moments_by_hand(x.double(), v.double(), sigma, sigma_next, a, noise_sigma)
    out, log_prob = sde_step_with_logprob(v, x, sigma, sigma_next, a, prev_sample=x_next, **kw)
    assert torch.equal(out, x_next) and log_prob.shape == (1,) and log_prob.dtype == torch.float32
    # float32 vs float64: 1 − 0.999 keeps ~4 digits in float32
    assert log_prob.item() == pytest.approx(hand_logprob(x_next, mean, std), rel=2e-5, abs=1e-5)


def test_cps_logprob_matches_a_hand_computed_gaussian():
    a, sigma, sigma_next = 0.7, 0.6, 0.4
    x, v, x_next = torch.tensor([X]), torch.tensor([V]), torch.tensor([X_NEXT])
    mean, std = cps_moments_by_hand(x.double(), v.double(), sigma, sigma_next, a)
    _, log_prob = cps_step_with_logprob(v, x, sigma, sigma_next, a, prev_sample=x_next)
    assert log_prob.item() == pytest.approx(hand_logprob(x_next, mean, std), abs=1e-5)


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_per_sample_sigmas_equal_scalar_sigmas(step):
    x, v = randn(3, 2, 4, 4, seed=1), randn(3, 2, 4, 4, seed=2)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.1])
    x_next = randn(3, 2, 4, 4, seed=3)
    _, batched = step(v, x, sigma, sigma_next, 0.7, prev_sample=x_next)
    for i in range(3):
        _, one = step(
            v[i : i + 1], x[i : i + 1], sigma[i].item(), sigma_next[i].item(), 0.7, prev_sample=x_next[i : i + 1]
        )
        torch.testing.assert_close(batched[i : i + 1], one)


# --- sampling: reproducible, exact re-evaluation, bf16, moments -----------------------


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_seeded_sample_is_reproducible_and_reevaluation_exact(step):
    x, v = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    a1, lp1 = step(v, x, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    a2, lp2 = step(v, x, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(lp1, lp2)
    _, again = step(v, x, 0.6, 0.5, 0.7, prev_sample=a1)
    assert torch.equal(again, lp1)


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_logprob_of_a_stored_sample_has_a_gradient_in_v(step):
    x, v = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2).requires_grad_()
    x_next, _ = step(v.detach(), x, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    _, log_prob = step(v, x, 0.6, 0.5, 0.7, prev_sample=x_next)
    log_prob.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_bf16_inputs_give_float32_logprob_close_to_fp32(step):
    x, v = randn(2, 4, 16, 16, seed=1), randn(2, 4, 16, 16, seed=2)
    x32, lp32 = step(v, x, 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    x16, lp16 = step(v.bfloat16(), x.bfloat16(), 0.6, 0.5, 0.7, generator=torch.Generator().manual_seed(7))
    assert x16.dtype == torch.bfloat16 and lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 2e-3  # measured 3.4e-4 (SDE), 1.9e-4 (CPS)
    assert (x16.float() - x32).abs().max() < 0.05  # bf16 rounding of |x| ~ 3
    _, again = step(v.bfloat16(), x.bfloat16(), 0.6, 0.5, 0.7, prev_sample=x16)
    assert torch.equal(again, lp16)  # the log-prob is of the stored (rounded) sample


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_empirical_moments_match_mean_and_std(sampler):
    n, a, sigma, sigma_next = 20000, 0.7, 0.6, 0.45
    x = torch.tensor([X]).expand(n, 3)
    v = torch.tensor([V]).expand(n, 3)
    if sampler == "sde":
        mean, std = sde_moments_by_hand(x[:1], v[:1], sigma, sigma_next, a, sigma)
        x_next, _ = sde_step_with_logprob(v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(0))
    else:
        mean, std = cps_moments_by_hand(x[:1], v[:1], sigma, sigma_next, a)
        x_next, _ = cps_step_with_logprob(v, x, sigma, sigma_next, a, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_next.mean(0, keepdim=True), mean, rtol=0, atol=4 * std / math.sqrt(n))
    torch.testing.assert_close(x_next.std(0), torch.full((3,), std), rtol=0.03, atol=0)


def test_cps_preserves_the_path_coefficients():
    """With the exact velocity of a known (x0, ε), x_next − (1−σ_next)·x0 has std σ_next."""
    sigma, sigma_next = 0.6, 0.45
    x0, eps = randn(8, 64, 64, seed=1), randn(8, 64, 64, seed=2)
    x, v = (1 - sigma) * x0 + sigma * eps, eps - x0
    x_next, _ = cps_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(0))
    assert (x_next - (1 - sigma_next) * x0).std().item() == pytest.approx(sigma_next, rel=0.01)


# --- refusals -------------------------------------------------------------------------


def test_cps_step_to_sigma_zero_is_refused():
    x, v = randn(1, 4, seed=1), randn(1, 4, seed=2)
    with pytest.raises(ValueError, match="sigma_next = 0"):
        cps_step_with_logprob(v, x, 0.1, 0.0, 0.7)
    with pytest.raises(ValueError, match=r"sde_window that ends at or before step 9"):
        sample_flow_trajectories(lambda x, s: x, flow_scheduler().sigmas, x, 0.7, sampler="cps")


@pytest.mark.parametrize(
    "step, kw, match",
    [
        (sde_step_with_logprob, {"sigma": 0.5, "sigma_next": 0.6}, "sigma_next < sigma"),
        (sde_step_with_logprob, {"sigma": 1.2, "sigma_next": 0.6}, "sigma <= 1"),
        (sde_step_with_logprob, {"noise_level": 0.0}, "noise_level must be > 0"),
        (sde_step_with_logprob, {"sigma_max": 1.0}, "sigma_max"),
        (sde_step_with_logprob, {"sigma": 1.0, "sigma_next": 0.0}, "no noise scale"),
        (cps_step_with_logprob, {"noise_level": 1.5}, r"noise_level must lie in \(0, 1\]"),
    ],
)
def test_bad_step_arguments_raise(step, kw, match):
    args = {"sigma": 0.6, "sigma_next": 0.5, "noise_level": 0.7, **kw}
    with pytest.raises(ValueError, match=match):
        step(randn(1, 4, seed=2), randn(1, 4, seed=1), **args)


def test_sde_window_mask():
    assert sde_window_mask(4, None).tolist() == [True] * 4
    assert sde_window_mask(5, [1, 3]).tolist() == [False, True, True, False, False]
    assert sde_window_mask(5, (0, 5)).all()
    for bad in [(3, 2), (2, 2), (-1, 2), (0, 6), (0.0, 2), [1], (0, 1, 2), "ab", (True, 2)]:
        with pytest.raises(ValueError, match=rf"sde_window {re.escape(repr(bad))} .*num_steps=5"):
            sde_window_mask(5, bad)


# --- whole trajectories ---------------------------------------------------------------


def point_velocity(x0):
    """Exact velocity of the flow whose data is the single point x0: v = (x − x0)/σ."""

    def velocity(x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == torch.float32
        return (x - x0) / sigma.view(-1, *([1] * (x.ndim - 1)))

    return velocity


def test_ode_trajectory_matches_the_scheduler_loop_and_lands_on_the_data():
    s, x0, x_T = flow_scheduler(), randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    velocity = point_velocity(x0)
    traj = sample_flow_trajectories(velocity, s.sigmas, x_T, 0.7, sampler="ode")
    x = x_T
    for k, t in enumerate(s.timesteps):
        x = s.step(velocity(x, s.sigmas[k].expand(2)), t, x).prev_sample
        assert torch.equal(traj.latents[:, k + 1], x)
    torch.testing.assert_close(traj.latents[:, -1], x0)
    assert not traj.stochastic.any() and torch.equal(traj.log_probs, torch.zeros(2, NUM_STEPS))


@pytest.mark.parametrize("sampler, window", [("sde", None), ("sde", (2, 5)), ("cps", (0, 9))])
def test_trajectory_log_probs_reevaluate_exactly(sampler, window):
    s, x0, x_T = flow_scheduler(), randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    velocity, sigmas = point_velocity(x0), s.sigmas
    traj = sample_flow_trajectories(
        velocity, sigmas, x_T, 0.7, window, sampler, generator=torch.Generator().manual_seed(3)
    )
    assert traj.latents.shape == (2, NUM_STEPS + 1, 4, 8, 8) and traj.log_probs.shape == (2, NUM_STEPS)
    assert torch.equal(traj.stochastic, sde_window_mask(NUM_STEPS, window)) and torch.equal(traj.latents[:, 0], x_T)
    assert torch.isfinite(traj.log_probs).all() and (traj.log_probs[:, ~traj.stochastic] == 0).all()
    again = sample_flow_trajectories(
        velocity, sigmas, x_T, 0.7, window, sampler, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(again.latents, traj.latents)
    step = sde_step_with_logprob if sampler == "sde" else cps_step_with_logprob
    for k in torch.nonzero(traj.stochastic).flatten().tolist():
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        v = velocity(x, sigmas[k].expand(2))
        _, log_prob = step(v, x, sigmas[k], sigmas[k + 1], 0.7, prev_sample=x_next)
        assert torch.equal(log_prob, traj.log_probs[:, k])
        assert traj.log_probs[:, k].ne(0).all()


def test_trajectory_refuses_bad_arguments():
    x = randn(1, 4, seed=1)
    with pytest.raises(ValueError, match="unknown sampler 'sdee'"):
        sample_flow_trajectories(lambda x, s: x, [1.0, 0.0], x, 0.7, sampler="sdee")
    with pytest.raises(ValueError, match="sampler 'ode' has no stochastic steps"):
        sample_flow_trajectories(lambda x, s: x, [1.0, 0.0], x, 0.7, window=(0, 1), sampler="ode")
    with pytest.raises(ValueError, match="decrease strictly"):
        sample_flow_trajectories(lambda x, s: x, [1.0, 0.5, 0.5, 0.0], x, 0.7)
    with pytest.raises(ValueError, match=r"sde_window \(0, 4\)"):
        sample_flow_trajectories(lambda x, s: x, [1.0, 0.5, 0.0], x, 0.7, window=(0, 4))
