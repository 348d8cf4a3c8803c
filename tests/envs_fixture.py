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


class BrightPixel(gym.Env):
    """``size``×``size``×1 uint8 frames (channels last; ``channels_first`` gives 1×size×size)
    with one bright pixel in the left or right half; action 0/1 guesses the half, reward
    1 when right. Episodes last ``length`` steps."""

    action_space = gym.spaces.Discrete(2)

    def __init__(self, size: int = 36, length: int = 8, channels_first: bool = False):
        self.size, self.length, self.channels_first = size, length, channels_first
        shape = (1, size, size) if channels_first else (size, size, 1)
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.t, self.side = 0, 0

    def _frame(self) -> np.ndarray:
        self.side = int(self.np_random.integers(2))
        frame = np.zeros((self.size, self.size), np.uint8)
        half = self.size // 2
        frame[self.np_random.integers(self.size), self.side * half + self.np_random.integers(half)] = 255
        return frame[None] if self.channels_first else frame[..., None]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._frame(), {}

    def step(self, action):
        reward = float(int(action) == self.side)
        self.t += 1
        return self._frame(), reward, False, self.t >= self.length, {}


class PixelsAndVector(BrightPixel):
    """A Dict observation: BrightPixel's frame (1×36×36, channels first) under "image" and
    a 3-vector under "state" whose first entry is ±1 for the side as well."""

    def __init__(self, size: int = 36, length: int = 8):
        super().__init__(size, length, channels_first=True)
        self.observation_space = gym.spaces.Dict(
            {"image": self.observation_space, "state": gym.spaces.Box(-1.0, 1.0, (3,), np.float32)}
        )

    def _frame(self):
        image = super()._frame()
        state = np.array([2.0 * self.side - 1.0, 0.0, 0.5], np.float32)
        return {"image": image, "state": state}


class SpaceProbe(gym.Env):
    """A 4-vector observation (uniform noise) and the action space named by ``action``:
    ``multidiscrete`` (nvec [3, 2]), ``multibinary`` (3 bits), ``box2d`` (a 2×2 Box in
    [-1, 1]) or ``tuple`` (unsupported); ``observation="text"`` or ``"graph"`` for an
    unsupported observation space. Reward: how close the action is to a fixed target
    (1 for a perfect match). Episodes last 10 steps."""

    def __init__(self, action: str = "multidiscrete", observation: str = "box"):
        s = gym.spaces
        self.action_space = {
            "multidiscrete": s.MultiDiscrete([3, 2]),
            "multibinary": s.MultiBinary(3),
            "box2d": s.Box(-1.0, 1.0, (2, 2), np.float32),
            "tuple": s.Tuple((s.Discrete(2), s.Discrete(3))),
        }[action]
        self.observation_space = {
            "box": s.Box(-1.0, 1.0, (4,), np.float32),
            "text": s.Text(8),
            "graph": s.Graph(s.Box(-1.0, 1.0, (2,)), s.Discrete(2)),
        }[observation]
        self.kind, self.t = action, 0

    def _obs(self):
        return self.np_random.uniform(-1, 1, 4).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        if self.kind == "box2d":
            assert action.shape == (2, 2)
            reward = -float(np.abs(action - 0.5).mean())
        elif self.kind == "multibinary":
            assert action.shape == (3,) and action.dtype == np.int8
            reward = float((action == np.array([1, 0, 1])).mean())
        else:
            assert action.shape == (2,) and 0 <= action[0] < 3 and 0 <= action[1] < 2
            reward = float((action == np.array([2, 1])).mean())
        return self._obs(), reward, False, self.t >= 10, {}


class LivesGame(gym.Env):
    """A game with ``lives`` lives, reporting them in ``info["lives"]`` as ALE does: one
    is lost every ``per_life`` steps, the game ends with the last; every step scores
    ``points`` (more than 1, so clipping shows)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, lives: int = 3, per_life: int = 3, points: float = 5.0):
        self.max_lives, self.per_life, self.points = lives, per_life, points

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.lives, self.t = self.max_lives, 0
        return np.zeros(2, np.float32), {"lives": self.lives}

    def step(self, action):
        self.t += 1
        if self.t % self.per_life == 0:
            self.lives -= 1
        obs = np.full(2, self.t / 100.0, np.float32)
        return obs, self.points, self.lives == 0, False, {"lives": self.lives}
