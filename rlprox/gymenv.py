"""Gymnasium plumbing shared by the env-based trainers (PPO, PolicyFlow).

- ``make_vec_env``: gymnasium id or "module:Class", user wrappers, sync/async vector
  env in SAME_STEP autoreset mode (the step that ends an episode returns the reset
  observation and puts the true last observation in ``info["final_obs"]``).
- ``EpisodeReplay``: makes env state checkpointable without pickling: it records the
  RNG state before each reset and the actions since, so a resumed run rebuilds each
  env's exact mid-episode state by replaying its current episode.
- ``RunningMeanStd`` / ``RewardScaler``: observation and reward normalisation kept in
  the algorithm (not in env wrappers) so the statistics are saved in checkpoints, used
  by ``rlprox eval``, and merged across processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import gymnasium as gym

from rlprox.recipe import EnvConfig, resolve_object


class EpisodeReplay(gym.Wrapper):
    """Records what is needed to rebuild the env's current state (see module doc)."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index
        self._reset_seed = None
        self._reset_rng = None
        self._actions: list = []

    def reset(self, *, seed=None, options=None):
        rng = self.env.unwrapped._np_random
        self._reset_rng = None if (seed is not None or rng is None) else rng.bit_generator.state
        self._reset_seed = seed
        self._reset_options = options
        self._actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        # numpy scalars are immutable; arrays may be views of the caller's buffer
        self._actions.append(action.copy() if isinstance(action, np.ndarray) else action)
        return self.env.step(action)

    def replay_state(self) -> dict:
        actions = self._actions
        return {
            "seed": self._reset_seed,
            "rng": self._reset_rng,
            "options": self._reset_options,
            "actions": [np.asarray(a).tolist() for a in actions],
            "dtype": str(np.asarray(actions[0]).dtype) if actions else "float32",
        }

    def restore_replay(self, states: list[dict]):
        state = states[self.index]
        if state["rng"] is not None:
            bitgen = getattr(np.random, state["rng"]["bit_generator"])()
            bitgen.state = state["rng"]
            self.env.unwrapped._np_random = np.random.Generator(bitgen)
        obs, _ = self.reset(seed=state["seed"], options=state["options"])
        for a in state["actions"]:
            obs, *_ = self.step(np.asarray(a, dtype=state["dtype"]))
        return obs


def _env_factory(cfg: EnvConfig, index: int, render_mode=None):
    def make():
        kwargs = dict(cfg.kwargs)
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        if ":" in cfg.id:
            env = resolve_object(cfg.id, "env.id")(**kwargs)
            if cfg.max_episode_steps:
                env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
        else:
            import rlprox.envs  # noqa: F401  registers rlprox/ envs

            # the passive checker only inspects the first step but stays in the call
            # chain of every step; recipes are validated elsewhere
            # OrderEnforcing guards against step-before-reset, which the vector env never does
            spec = dataclasses.replace(gym.spec(cfg.id), order_enforce=False)
            env = gym.make(spec, max_episode_steps=cfg.max_episode_steps or None, disable_env_checker=True, **kwargs)
        for i, spec in enumerate(cfg.wrappers):
            env = resolve_object(spec, f"env.wrappers[{i}]")(env)
        return EpisodeReplay(env, index)

    return make


def make_vec_env(cfg: EnvConfig, num_envs: int | None = None, vectorization: str | None = None) -> gym.vector.VectorEnv:
    n = num_envs or cfg.num_envs
    fns = [_env_factory(cfg, i) for i in range(n)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if (vectorization or cfg.vectorization) == "async" and n > 1:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


class RunningMeanStd:
    """Running mean/variance (Chan et al. parallel update), float64.

    Kept as a *base* (identical on every process) plus a *local* delta gathered since
    the last ``sync``; normalisation uses both, and ``sync`` merges every process's
    delta into the base so all ranks end each iteration with the same statistics.
    """

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon
        self._reset_delta(shape)

    def _reset_delta(self, shape):
        self.d_mean = np.zeros(shape, np.float64)
        self.d_var = np.zeros(shape, np.float64)
        self.d_count = 0.0

    @staticmethod
    def merge(m1, v1, n1, m2, v2, n2):
        n = n1 + n2
        if n2 == 0:
            return m1, v1, n1
        delta = m2 - m1
        mean = m1 + delta * n2 / n
        m2_sum = v1 * n1 + v2 * n2 + delta**2 * n1 * n2 / n
        return mean, m2_sum / n, n

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        self.d_mean, self.d_var, self.d_count = self.merge(self.d_mean, self.d_var, self.d_count, x.mean(0), x.var(0), x.shape[0])

    def stats(self):
        return self.merge(self.mean, self.var, self.count, self.d_mean, self.d_var, self.d_count)

    def sync(self, accelerator=None) -> None:
        deltas = [(self.d_mean, self.d_var, self.d_count)]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            deltas = gather_object([(self.d_mean.tolist(), self.d_var.tolist(), self.d_count)])
            deltas = [(np.asarray(m), np.asarray(v), c) for m, v, c in deltas]
        for m, v, c in deltas:  # same order on every rank -> identical result
            self.mean, self.var, self.count = self.merge(self.mean, self.var, self.count, m, v, c)
        self._reset_delta(self.mean.shape)

    def normalize(self, x: np.ndarray, clip: float) -> np.ndarray:
        mean, var, _ = self.stats()
        return np.clip((x - mean) / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)

    def state_dict(self) -> dict:
        mean, var, count = self.stats()
        return {"mean": mean.tolist(), "var": var.tolist(), "count": count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = np.asarray(state["mean"], np.float64)
        self.var = np.asarray(state["var"], np.float64)
        self.count = float(state["count"])
        self._reset_delta(self.mean.shape)


class RewardScaler:
    """Reward normalisation as in gymnasium's NormalizeReward: divide each reward by
    the running std of the per-env discounted return G ← γ·G·(1 − done) + r."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs, np.float64)
        self.rms = RunningMeanStd(())

    def __call__(self, reward: np.ndarray, done: np.ndarray, clip: float) -> np.ndarray:
        self.returns = self.returns * self.gamma + reward
        self.rms.update(self.returns)
        self.returns[done] = 0.0
        _, var, _ = self.rms.stats()
        return np.clip(reward / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"returns": self.returns.tolist(), "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.returns = np.asarray(state["returns"], np.float64)
        self.rms.load_state_dict(state["rms"])
