"""MultiGoal dynamics, reward, clipping, termination and info["goal"] by hand."""

import gymnasium as gym
import numpy as np
import pytest

import rlprox.envs  # noqa: F401
from rlprox.envs import MultiGoal, ring


def test_registered_ids_and_spaces():
    env = gym.make("rlprox/MultiGoal-v0")
    assert env.observation_space.shape == (2,) and env.action_space.shape == (2,)
    assert len(gym.make("rlprox/MultiGoal6-v0").unwrapped.goals) == 6
    np.testing.assert_allclose(ring(4)[1], (0.0, 5.0), atol=1e-12)


def test_hand_computed_steps():
    env = MultiGoal()
    obs, info = env.reset(seed=3)
    assert info["goal"] == -1 and np.abs(obs).max() < 0.5  # s0 ~ N(0, 0.1²)
    env.state = np.array([0.0, 0.0])
    obs, r, term, trunc, info = env.step(np.array([2.0, 0.5]))  # clipped to (1, 0.5)
    np.testing.assert_allclose(obs, [1.0, 0.5])
    # nearest goal (5, 0): squared distance 16.25; action cost 30 · (1 + 0.25)
    assert r == pytest.approx(-30 * 1.25 - 16.25) and not term and not trunc and info["goal"] == -1
    env.state = np.array([-4.5, 0.2])
    obs, r, term, trunc, info = env.step(np.array([0.0, 0.0]))
    d2 = 0.5**2 + 0.2**2
    assert term and info["goal"] == 1 and r == pytest.approx(-d2 + 10.0)  # (−5, 0) is goal 1
    env.state = np.array([6.9, -6.9])
    obs, *_ = env.step(np.array([1.0, -1.0]))
    np.testing.assert_allclose(obs, [7.0, -7.0])  # the box


def test_truncation_at_horizon_and_costs_are_arguments():
    env = MultiGoal(horizon=3, action_cost=0.0, distance_cost=0.0, goal_reward=1.0)
    env.reset(seed=0)
    outs = [env.step(np.zeros(2)) for _ in range(3)]
    assert [o[3] for o in outs] == [False, False, True] and all(o[1] == 0.0 for o in outs)


def test_action_modes_counts_separated_clusters_and_not_one_gaussian():
    from rlprox.gymenv import action_modes

    rng = np.random.default_rng(0)
    centres = np.array(ring(6, 1.0))
    three = np.concatenate([c + 0.05 * rng.standard_normal((300, 2)) for c in centres[:3]])
    modes, k, score = action_modes(three)
    assert (modes, k) == (3, 3) and score > 0.8
    # a cluster with < 10% of the draws does not count as a mode
    lopsided = np.concatenate([three, centres[3] + 0.05 * rng.standard_normal((40, 2))])
    assert action_modes(lopsided)[0] == 3
    # one Gaussian blob: no k reaches silhouette 0.5, so one mode
    assert action_modes(rng.standard_normal((1000, 2)))[:2] == (1, 1)


def test_goal_coverage_counts_goals_with_at_least_ten_percent_of_the_hits():
    from rlprox.gymenv import goal_metrics

    ids = [0] * 12 + [1] * 80 + [2] * 8 + [-1] * 5  # goal 2: 8% of the hits
    out = goal_metrics(ids, 4)
    assert out["goal_coverage"] == 2.0 and out["success_rate"] == pytest.approx(100 / 105)
    assert goal_metrics(ids, 4, prefix="origin_")["origin_goal_coverage"] == 2.0
