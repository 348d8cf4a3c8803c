"""Atari through gymnasium and ale-py, preprocessed as the standard DQN/PPO setups do.

``env.preprocessing: atari`` builds each env as

    ALE/<Game>-v5 (frameskip 1, sticky actions off by default)
    → gymnasium ``AtariPreprocessing``: up to ``noop_max`` no-ops after a reset, each
      action repeated ``frame_skip`` frames with the last two max-pooled, frames resized
      to ``screen_size``² and turned grey
    → gymnasium ``FrameStackObservation``: the last ``frame_stack`` frames, (N, 84, 84) uint8.

The two transforms that only training wants — a lost life ends the episode, rewards
become their sign — are not wrappers: the trainer's rollout applies them
(``rlprox.gymenv.GymRollout``), so evaluation, videos and the episode statistics of
training all count the unclipped score of full games.

Exact resume: ALE keeps a random state of its own (sticky actions draw from it) that the
replay of an episode (``rlprox.gymenv.EpisodeReplay``: the reset's numpy RNG and the actions
since) does not cover, so the replay also records the emulator's state with its generator
at each reset (``ale.cloneState(include_rng=True)``, 14 KB) and restores it before replaying.
"""

from __future__ import annotations

import gymnasium as gym

ALE_PREFIX = "ALE/"
EXTRA = "atari"  # pip install 'rlprox[atari]'


def is_ale_id(env_id: str) -> bool:
    return env_id.startswith(ALE_PREFIX)


def import_ale() -> None:
    """Import ale-py, which registers the ``ALE/`` ids; ImportError names the extra."""
    try:
        import ale_py
    except ImportError as err:
        raise ImportError(f"Atari needs ale-py (pip install 'rlprox[{EXTRA}]'): {err}") from None
    gym.register_envs(ale_py)


def make_kwargs(options, kwargs: dict) -> dict:
    """The ALE constructor's arguments: the recipe's, with frame skipping left to the
    preprocessing and the sticky-action probability of ``options``."""
    return {**kwargs, "frameskip": 1, "repeat_action_probability": options.repeat_action_probability}


def preprocess(env: gym.Env, options) -> gym.Env:
    """Wrap an ALE env (built with ``make_kwargs``) in the preprocessing of ``options``."""
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    try:
        env = AtariPreprocessing(
            env,
            noop_max=options.noop_max,
            frame_skip=options.frame_skip,
            screen_size=options.screen_size,
            terminal_on_life_loss=False,
            grayscale_obs=options.grayscale,
            scale_obs=False,
        )
    except gym.error.DependencyNotInstalled as err:
        raise ImportError(f"Atari preprocessing needs opencv (pip install 'rlprox[{EXTRA}]'): {err}") from None
    if options.frame_stack > 1:
        env = FrameStackObservation(env, options.frame_stack)
    return env
