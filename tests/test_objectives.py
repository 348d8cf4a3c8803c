"""Tier 1: the pure loss pieces against hand-computed values and slow loops."""

import math

import numpy as np
import pytest
import torch

from rlprox import objectives


def gae_loop(rewards, values, next_values, terminated, done, gamma, lam):
    """The textbook per-env, per-step recursion, written as plainly as possible."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            delta = rewards[t, n] + gamma * next_values[t, n] * (1 - terminated[t, n]) - values[t, n]
            running = delta + gamma * lam * (1 - done[t, n]) * running
            adv[t, n] = running
    return adv


def test_gae_hand_values():
    # 3 steps, 1 env, no episode end: hand-expanded recursion
    r = np.array([[1.0], [2.0], [3.0]])
    v = np.array([[0.5], [1.0], [1.5]])
    nv = np.array([[1.0], [1.5], [2.0]])
    zeros = np.zeros_like(r)
    g, lam = 0.9, 0.8
    d2 = 3 + g * 2.0 - 1.5
    d1 = 2 + g * 1.5 - 1.0
    d0 = 1 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = objectives.gae(r, v, nv, zeros, zeros, g, lam)
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2])
    np.testing.assert_allclose(ret, adv + v)


def test_gae_truncation_bootstraps_termination_does_not():
    r = np.array([[1.0, 1.0]])
    v = np.array([[0.0, 0.0]])
    nv = np.array([[10.0, 10.0]])  # V(final obs) = 10
    term = np.array([[1.0, 0.0]])  # env 0 terminated, env 1 truncated
    done = np.array([[1.0, 1.0]])
    adv, _ = objectives.gae(r, v, nv, term, done, 0.5, 0.9)
    assert adv[0, 0] == pytest.approx(1.0)  # no bootstrap
    assert adv[0, 1] == pytest.approx(1.0 + 0.5 * 10.0)  # bootstraps


def test_gae_vectorised_equals_loop():
    rng = np.random.default_rng(0)
    T, N = 37, 5
    r, v, nv = rng.normal(size=(3, T, N))
    term = (rng.random((T, N)) < 0.1).astype(float)
    trunc = (rng.random((T, N)) < 0.05).astype(float)
    done = np.maximum(term, trunc)
    adv, _ = objectives.gae(r, v, nv, term, done, 0.99, 0.95)
    np.testing.assert_allclose(adv, gae_loop(r, v, nv, term, done, 0.99, 0.95), rtol=1e-12)


def test_clipped_surrogate_hand_values():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, ratio = objectives.clipped_surrogate(logp, old, adv, 0.2)
    # min(r A, clip(r) A): 1.2, 0.5, -1.1, -0.8
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1 - 0.8) / 4)
    np.testing.assert_allclose(ratio.numpy(), [1.5, 0.5, 1.1, 0.7], rtol=1e-6)
    assert objectives.clip_fraction(ratio, 0.2).item() == pytest.approx(0.75)


def test_value_loss_clipped_and_plain():
    v, ret, old = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5])
    assert objectives.value_loss(v, ret).item() == pytest.approx(0.5 * (4 + 0) / 2)
    # clipped: v0 -> 1.2 (err 1.44 < 4, max keeps 4); v1 -> 0.3 (0.09 > 0)
    assert objectives.value_loss(v, ret, old, 0.2).item() == pytest.approx(0.5 * (4 + 0.09) / 2)


def test_kl_k3_zero_at_equal_unbiased_and_hand_values():
    logp = torch.tensor([-1.0, -2.0])
    assert objectives.kl_k3(logp, logp).item() == 0.0
    assert objectives.kl_k3(logp, logp + 0.3).item() > 0
    # p = N(0,1) sampled, q = N(0.3,1): KL(p‖q) = 0.3²/2 = 0.045
    a = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(objectives.kl_k3(-0.5 * a**2, -0.5 * (a - 0.3) ** 2)) == pytest.approx(0.045, abs=2e-3)
    # r = q/p = 2 on the first sample, 1 on the second: mean of (r − 1 − log r)
    lp, rp = torch.tensor([0.0, 0.0]), torch.tensor([math.log(2.0), 0.0])
    assert float(objectives.kl_k3(lp, rp)) == pytest.approx((1 - math.log(2.0)) / 2)


def test_leave_one_out_and_group_normalize():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    np.testing.assert_allclose(objectives.leave_one_out(r)[0].numpy(), [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    assert objectives.leave_one_out(r).sum().item() == pytest.approx(0.0, abs=1e-6)
    g = objectives.group_normalize(r)
    assert g.mean().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="K >= 2"):
        objectives.leave_one_out(torch.ones(3, 1))


def test_normalize_with_given_moments():
    x = torch.tensor([1.0, 3.0])
    assert torch.allclose(
        objectives.normalize(x, mean=torch.tensor(1.0), std=torch.tensor(2.0), eps=0.0), torch.tensor([0.0, 1.0])
    )


def test_leave_one_out_identities_and_nan_rule():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a = objectives.leave_one_out(r)
    torch.testing.assert_close(a.sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)  # Σ_k A = 0
    torch.testing.assert_close(a, 4 / 3 * (r - r.mean(-1, keepdim=True)))  # A = K/(K−1)(r − r̄)
    r_nan = torch.tensor(
        [[1.0, float("nan"), 3.0, 5.0], [float("nan"), 2.0, float("nan"), float("nan")], [float("inf"), 1.0, 1.0, 4.0]]
    )
    a = objectives.leave_one_out(r_nan)
    # group 0: finite {1, 3, 5}, c = 3: A = 3/2 (r − 3); the NaN sample gets 0
    torch.testing.assert_close(a[0], torch.tensor([-3.0, 0.0, 0.0, 3.0]))
    assert torch.equal(a[1], torch.zeros(4))  # fewer than 2 finite rewards: all zero
    torch.testing.assert_close(a[2], torch.tensor([0.0, -1.5, -1.5, 3.0]))  # inf is left out like NaN
    assert torch.isfinite(a).all()


def test_group_normalize_zero_spread_nan_and_clip():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [1.0, float("nan"), 3.0]])
    a = objectives.group_normalize(r)
    torch.testing.assert_close(a[0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)  # unbiased std = 1
    assert torch.equal(a[1], torch.zeros(3))  # zero spread: 0, not 0/eps noise
    torch.testing.assert_close(a[2], torch.tensor([-1.0 / 2**0.5, 0.0, 1.0 / 2**0.5]), atol=1e-6, rtol=0)
    clipped = objectives.group_normalize(torch.tensor([[0.0, 0.0, 0.0, 100.0]]), clip=1.0)
    assert clipped.max() == 1.0 and clipped.min() >= -1.0


def test_zero_spread_marks_groups_without_relative_signal():
    rewards = torch.tensor([[0.3, 0.3], [0.2, 0.4], [0.2, float("nan")], [float("nan"), float("nan")]])
    assert objectives.zero_spread(rewards).tolist() == [True, False, True, True]
