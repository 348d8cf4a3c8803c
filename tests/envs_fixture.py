"""Tiny deterministic envs for tests (referenced as "tests.envs_fixture:Class")."""

import gymnasium as gym
import numpy as np


class Counter(gym.Env):
    """obs = [steps taken]; reward 1; terminates at step ``terminate_at`` (0: never)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, terminate_at: int = 0):
        self.terminate_at = terminate_at
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at > 0 and self.t >= self.terminate_at
        return np.array([float(self.t)], np.float32), 1.0, terminated, False, {}


class ScaleReward(gym.RewardWrapper):
    def reward(self, reward):
        return 2.0 * reward


class RenderedCounter(Counter):
    """Counter with rgb_array frames (a bar one pixel longer per step): video tests
    that need no renderer package."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, terminate_at: int = 0, render_mode: str | None = None):
        super().__init__(terminate_at)
        self.render_mode = render_mode

    def render(self):
        frame = np.zeros((16, 32, 3), np.uint8)
        frame[4:12, : min(self.t + 1, 32)] = 255
        return frame
