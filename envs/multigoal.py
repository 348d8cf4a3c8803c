"""MultiGoal: a 2-D point that can end its episode at any of several goals — the
standard test of whether a policy keeps several modes (Haarnoja et al. 2017's
multi-goal environment, in the variant PolicyFlow evaluates).

    s' = clip(s + clip(a, −1, 1), −bound, bound)                       (s ∈ ℝ², s₀ ~ N(0, 0.1²·I))
    r  = −action_cost·‖clip(a)‖² − distance_cost·min_g ‖s' − g‖²  (+ goal_reward when ‖s' − g‖ < goal_radius)

Reaching a goal terminates the episode; ``horizon`` steps truncate it.
``info["goal"]`` is the index of the goal reached (in ``goals`` order), −1 otherwise.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

FOUR_GOALS = ((5.0, 0.0), (-5.0, 0.0), (0.0, 5.0), (0.0, -5.0))


def ring(n: int, radius: float = 5.0) -> tuple[tuple[float, float], ...]:
    """``n`` goals evenly on a circle, the first at (radius, 0)."""
    return tuple((radius * math.cos(2 * math.pi * k / n), radius * math.sin(2 * math.pi * k / n)) for k in range(n))


class MultiGoal(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        goals=FOUR_GOALS,
        action_cost: float = 30.0,
        distance_cost: float = 1.0,
        goal_reward: float = 10.0,
        goal_radius: float = 1.0,
        horizon: int = 30,
        bound: float = 7.0,
        init_std: float = 0.1,
    ):
        self.goals = np.asarray(goals, np.float64).reshape(-1, 2)
        if len(self.goals) == 0:
            raise ValueError("MultiGoal needs at least one goal")
        self.action_cost, self.distance_cost = float(action_cost), float(distance_cost)
        self.goal_reward, self.goal_radius = float(goal_reward), float(goal_radius)
        self.horizon, self.bound, self.init_std = int(horizon), float(bound), float(init_std)
        self.observation_space = gym.spaces.Box(-self.bound, self.bound, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.state = np.zeros(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = self.np_random.normal(0.0, self.init_std, 2)
        self.t = 0
        return self.state.astype(np.float32), {"goal": -1}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        self.state = np.clip(self.state + a, -self.bound, self.bound)
        self.t += 1
        dist = np.linalg.norm(self.state - self.goals, axis=1)
        nearest = int(dist.argmin())
        reward = -self.action_cost * float(a @ a) - self.distance_cost * float(dist[nearest] ** 2)
        reached = bool(dist[nearest] < self.goal_radius)
        if reached:
            reward += self.goal_reward
        truncated = not reached and self.t >= self.horizon
        return self.state.astype(np.float32), reward, reached, truncated, {"goal": nearest if reached else -1}
