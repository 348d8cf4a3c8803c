"""Partially observed envs for recurrent policies: observation entries removed by a
wrapper, so a policy must remember what it cannot see.

- ``MaskObservation(env, indices)``: drops the given entries of a 1-D Box observation
  (recipes name it as ``env.wrappers: ["rlprox.envs.masked:MaskVelocity"]`` for CartPole);
- ``MaskVelocity``: CartPole's velocities removed (cart velocity, index 1, and pole
  angular velocity, index 3): the observation is (cart position, pole angle);
- ``rlprox/MaskedCartPole-v1``: CartPole-v1 (500 steps) seen through ``MaskVelocity``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class MaskObservation(gym.ObservationWrapper):
    """The env's 1-D Box observation without the entries ``indices``."""

    def __init__(self, env: gym.Env, indices):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"MaskObservation needs a 1-D Box observation (got {space})")
        drop = {int(i) for i in indices}
        self.keep = np.asarray([i for i in range(space.shape[0]) if i not in drop], np.int64)
        self.observation_space = gym.spaces.Box(space.low[self.keep], space.high[self.keep], dtype=space.dtype)

    def observation(self, observation):
        return np.asarray(observation)[self.keep]


class MaskVelocity(MaskObservation):
    """CartPole without its velocities: (x, ẋ, θ, θ̇) → (x, θ)."""

    def __init__(self, env: gym.Env):
        super().__init__(env, (1, 3))


def masked_cartpole(**kwargs) -> gym.Env:
    """CartPole (no time limit: the registration adds 500 steps) through ``MaskVelocity``."""
    from gymnasium.envs.classic_control import CartPoleEnv

    return MaskVelocity(CartPoleEnv(**kwargs))
