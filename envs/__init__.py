"""Gymnasium environments of the project, installed as ``rlprox.envs``.

Importing this package registers them under the ``rlprox/`` namespace, so recipes say
``env: {id: rlprox/MultiGoal-v0}``:

- ``rlprox/MultiGoal-v0``: the 4-goal 2-D point (PolicyFlow's multimodality test);
- ``rlprox/MultiGoal6-v0``: the same with 6 goals on a ring of radius 5;
- ``rlprox/MaskedCartPole-v1``: CartPole-v1 without its velocities (``rlprox.envs.masked``),
  a memory test for recurrent PPO (``ppo.lstm``).
"""

import gymnasium as gym

from rlprox.envs.multigoal import FOUR_GOALS, MultiGoal, ring

__all__ = ["MultiGoal", "FOUR_GOALS", "ring"]

for _id, _kwargs in (("rlprox/MultiGoal-v0", {}), ("rlprox/MultiGoal6-v0", {"goals": ring(6)})):
    if _id not in gym.registry:
        gym.register(_id, entry_point="rlprox.envs.multigoal:MultiGoal", kwargs=_kwargs)
if "rlprox/MaskedCartPole-v1" not in gym.registry:
    gym.register(
        "rlprox/MaskedCartPole-v1",
        entry_point="rlprox.envs.masked:masked_cartpole",
        max_episode_steps=500,
        reward_threshold=475.0,
    )
