"""The gymnasium side shared by the env-based trainers (PPO, PolicyFlow).

- ``EnvConfig`` / ``validate_env``: the recipe's ``env:`` section.
- ``make_vec_env``: gymnasium id or "module:Class", user wrappers, sync/async vector
  env in SAME_STEP autoreset mode (the step that ends an episode returns the reset
  observation and puts the true last observation in ``info["final_obs"]``).
- ``EpisodeReplay``: makes env state checkpointable without pickling: it records the
  RNG state before each reset and the actions since, so a resumed run rebuilds each
  env's exact mid-episode state by replaying its current episode.
- ``RunningMeanStd`` / ``RewardScaler``: observation and reward normalisation kept
  outside env wrappers so the statistics are saved in checkpoints, used by
  ``rlprox eval``, and merged across processes (one all-gather per iteration).
- ``GymRollout``: one process's vector envs + normalisers + episode statistics +
  replay state behind ``observe`` / ``step``; a trainer's collect loop only adds its
  policy and its buffers.
- ``run_episodes``: evaluation episodes of any policy function on fresh envs.

Observations of any supported space (a Box, images included, or a Dict of Boxes) are
flattened into float32 rows by their layout (``rlprox.spaces``); the model cuts them back.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Literal

import gymnasium as gym
import numpy as np

from rlprox.errors import RecipeError, RegistryError, did_you_mean
from rlprox.registry import resolve_object
from rlprox.spaces import ActionSpace, describe_entry, flatten_batch, observation_layout, widths


@dataclass
class AtariOptions:
    """The standard Atari preprocessing (``env.preprocessing: atari``; docs/usage.md). Every env, evaluation and
    video included, sees the same frames; the two training-only transforms act in the trainer's rollout, so
    evaluation reports the unclipped score of full games."""

    noop_max: int = 30  # up to N no-op actions after each reset (gymnasium draws 1..N, envpool 0..N-1; 0: none)
    frame_skip: int = 4  # each action repeated for N frames, the last two max-pooled
    screen_size: int = 84  # frames resized to N x N
    grayscale: bool = True  # one grey channel instead of RGB
    frame_stack: int = 4  # the observation: the last N frames, (N, size, size) uint8 (1: no stacking)
    repeat_action_probability: float = 0.0  # sticky actions (ALE v5's default is 0.25; CleanRL and envpool use 0)
    episodic_life: bool = True  # training only: a lost life ends the episode for the returns and the LSTM state
    clip_reward: bool = True  # training only: rewards become their sign


@dataclass
class EnvConfig:
    """A gymnasium vector env. Each process steps its own ``num_envs`` copies."""

    id: str = "CartPole-v1"  # gymnasium id, or "module:Class" / "module:function" returning an Env
    imports: list[str] = field(
        default_factory=list
    )  # modules to import first so they register their envs (e.g. gymnasium_robotics)
    num_envs: int = 8  # envs per process
    vectorization: Literal["sync", "async"] = (
        "sync"  # sync: every env stepped in this process; async: one subprocess per env
    )
    kwargs: dict = field(default_factory=dict)  # passed to gym.make / the class
    wrappers: list[str] = field(default_factory=list)  # "module:Class" wrappers applied to each env, in order
    max_episode_steps: int = 0  # 0: the env's own limit
    normalize_obs: bool = False  # running mean/std observation normalisation (saved in checkpoints)
    normalize_reward: bool = False  # scale rewards by the running std of the discounted return
    clip_obs: float = 10.0  # clip normalised observations to ±clip_obs
    clip_reward: float = 10.0  # clip normalised rewards to ±clip_reward
    backend: Literal["gymnasium", "envpool"] = "gymnasium"  # envpool: its C++ vector envs (Atari, MuJoCo ids it has)
    preprocessing: Literal["none", "atari"] = "none"  # atari: the options of ``atari`` (an ALE id)
    atari: AtariOptions = field(default_factory=AtariOptions)  # the Atari preprocessing's options


def _resolve(spec: str, key: str):
    try:
        return resolve_object(spec, key)
    except RegistryError as err:
        raise RecipeError(key, str(err)) from None


EXTRAS = {"gymnasium_robotics": "robotics", "mujoco": "mujoco"}


def import_env_modules(env: EnvConfig, key: str = "env") -> None:
    """Import ``env.imports`` (their envs register on import); a missing package is a
    one-line recipe error naming the extra that installs it."""
    import importlib

    for i, name in enumerate(env.imports):
        try:
            importlib.import_module(name)
        except ImportError as err:
            top = name.split(".")[0]
            extra = f" (pip install 'rlprox[{EXTRAS[top]}]')" if top in EXTRAS else ""
            raise RecipeError(f"{key}.imports[{i}]", f"cannot import {name!r}{extra}: {err}") from None


def import_ale(key: str) -> None:
    from rlprox.envs.atari import import_ale

    try:
        import_ale()
    except ImportError as err:
        raise RecipeError(key, str(err)) from None


def validate_atari(env: EnvConfig, key: str) -> None:
    """``env.preprocessing: atari``: an Atari id and options in range."""
    from rlprox.envs.atari import is_ale_id

    if env.backend == "gymnasium" and not is_ale_id(env.id):
        raise RecipeError(f"{key}.preprocessing", f"atari preprocessing needs an ALE/ id (got env.id {env.id!r})")
    opts, where = env.atari, f"{key}.atari"
    for name, low in (("noop_max", 0), ("frame_skip", 1), ("frame_stack", 1), ("screen_size", 8)):
        if getattr(opts, name) < low:
            raise RecipeError(f"{where}.{name}", f"must be >= {low} (got {getattr(opts, name)})")
    if not 0.0 <= opts.repeat_action_probability <= 1.0:
        raise RecipeError(
            f"{where}.repeat_action_probability", f"must be in [0, 1] (got {opts.repeat_action_probability})"
        )


def validate_env(env: EnvConfig, key: str = "env") -> None:
    import_env_modules(env, key)
    if env.num_envs <= 0:
        raise RecipeError(f"{key}.num_envs", f"must be > 0 (got {env.num_envs})")
    if env.max_episode_steps < 0:
        raise RecipeError(f"{key}.max_episode_steps", f"must be >= 0 (got {env.max_episode_steps})")
    if env.preprocessing == "atari":
        validate_atari(env, key)
    if env.backend == "envpool":
        from rlprox.envpool_backend import validate_envpool

        validate_envpool(env, key)
    elif ":" in env.id:
        _resolve(env.id, f"{key}.id")
    else:
        from rlprox.envs.atari import is_ale_id

        if is_ale_id(env.id):
            import_ale(f"{key}.id")
        import rlprox.envs  # noqa: F401  registers the rlprox/ namespace

        if env.id not in gym.registry:
            raise RecipeError(
                f"{key}.id", f"unknown gymnasium env {env.id!r}{did_you_mean(env.id, gym.registry.keys())}"
            )
    for i, wrapper in enumerate(env.wrappers):
        _resolve(wrapper, f"{key}.wrappers[{i}]")


def emulator_state(env: gym.Env) -> str | None:
    """An Atari env's emulator state with its random generator (sticky actions draw from it, outside
    numpy's), base64 text for the checkpoint's JSON; None for any other env."""
    ale = getattr(env, "ale", None)
    if ale is None or not hasattr(ale, "cloneState"):
        return None
    import base64

    return base64.b64encode(ale.cloneState(include_rng=True).serialize()).decode("ascii")


def restore_emulator(env: gym.Env, text: str) -> None:
    import base64

    from ale_py import ALEState

    env.ale.restoreState(ALEState(base64.b64decode(text)))


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
        self._reset_emulator = None if seed is not None else emulator_state(self.env.unwrapped)
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
            "emulator": self._reset_emulator,
            "actions": [np.asarray(a).tolist() for a in actions],
            "dtype": str(np.asarray(actions[0]).dtype) if actions else "float32",
        }

    def restore_replay(self, states: list[dict]):
        state = states[self.index]
        if state["rng"] is not None:
            bitgen = getattr(np.random, state["rng"]["bit_generator"])()
            bitgen.state = state["rng"]
            self.env.unwrapped._np_random = np.random.Generator(bitgen)
        if state.get("emulator") is not None:
            restore_emulator(self.env.unwrapped, state["emulator"])
        obs, _ = self.reset(seed=state["seed"], options=state["options"])
        for a in state["actions"]:
            obs, *_ = self.step(np.asarray(a, dtype=state["dtype"]))
        return obs


def _env_factory(cfg: EnvConfig, index: int, render_mode=None):
    def make():
        import_env_modules(cfg)
        kwargs = dict(cfg.kwargs)
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        if ":" in cfg.id:
            env = _resolve(cfg.id, "env.id")(**kwargs)
            if cfg.max_episode_steps:
                env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
        else:
            import rlprox.envs  # noqa: F401  registers rlprox/ envs

            # the passive checker only inspects the first step but stays in the call
            # chain of every step; recipes are validated elsewhere
            # OrderEnforcing guards against step-before-reset, which the vector env never does
            from rlprox.envs import atari as ale

            atari = cfg.preprocessing == "atari"
            if ale.is_ale_id(cfg.id):
                import_ale("env.id")
            limit = cfg.max_episode_steps or None
            if atari:  # the step limit counts agent steps, after the frame skip
                kwargs, limit = ale.make_kwargs(cfg.atari, kwargs), None
            spec = dataclasses.replace(gym.spec(cfg.id), order_enforce=False)
            env = gym.make(spec, max_episode_steps=limit, disable_env_checker=True, **kwargs)
            if atari:
                env = ale.preprocess(env, cfg.atari)
                if cfg.max_episode_steps:
                    env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
        for i, wrapper in enumerate(cfg.wrappers):
            env = _resolve(wrapper, f"env.wrappers[{i}]")(env)
        return EpisodeReplay(env, index)

    return make


def make_env(cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """One env of the recipe, as each vector env copy is built; ``render_mode`` (e.g.
    ``"rgb_array"``) is passed to the env's constructor."""
    return _env_factory(cfg, 0, render_mode)()


def make_vec_env(
    cfg: EnvConfig, num_envs: int | None = None, vectorization: str | None = None
) -> gym.vector.VectorEnv:
    n = num_envs or cfg.num_envs
    if cfg.backend == "envpool":
        from rlprox.envpool_backend import EnvpoolVectorEnv

        return EnvpoolVectorEnv(cfg, n)
    fns = [_env_factory(cfg, i) for i in range(n)]
    mode = gym.vector.AutoresetMode.SAME_STEP
    if (vectorization or cfg.vectorization) == "async" and n > 1:
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)


# ----------------------------------------------------------------------------- normalisers


class RunningMeanStd:
    """Running mean/variance (Chan et al. parallel update), float64.

    Kept as a *base* (identical on every process) plus a *local* delta gathered since
    the last merge; normalisation uses both, and ``sync_statistics`` merges every
    process's delta into the base so all ranks end each iteration with the same
    statistics.
    """

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon
        self._reset_delta()

    def _reset_delta(self):
        self.d_mean = np.zeros(self.mean.shape, np.float64)
        self.d_var = np.zeros(self.mean.shape, np.float64)
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
        self.d_mean, self.d_var, self.d_count = self.merge(
            self.d_mean, self.d_var, self.d_count, x.mean(0), x.var(0), x.shape[0]
        )

    def stats(self):
        return self.merge(self.mean, self.var, self.count, self.d_mean, self.d_var, self.d_count)

    def delta_vector(self) -> np.ndarray:
        """This process's un-merged statistics, packed: [mean, var, count]."""
        return np.concatenate([self.d_mean.ravel(), self.d_var.ravel(), [self.d_count]])

    def merge_deltas(self, deltas: list[np.ndarray]) -> None:
        """Fold every process's ``delta_vector`` into the base, in rank order (the same
        order on every rank, so every rank ends with identical statistics)."""
        size = self.mean.size
        for vec in deltas:
            m, v, c = (
                vec[:size].reshape(self.mean.shape),
                vec[size : 2 * size].reshape(self.mean.shape),
                float(vec[-1]),
            )
            self.mean, self.var, self.count = self.merge(self.mean, self.var, self.count, m, v, c)
        self._reset_delta()

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
        self._reset_delta()


def sync_statistics(stats: list[RunningMeanStd], accelerator=None) -> None:
    """Merge the local deltas of several ``RunningMeanStd`` across processes with a
    single all-gather (a no-op merge with one process)."""
    if not stats:
        return
    local = [s.delta_vector() for s in stats]
    if accelerator is None or accelerator.num_processes == 1:
        for s, vec in zip(stats, local):
            s.merge_deltas([vec])
        return
    import torch

    packed = torch.from_numpy(np.concatenate(local)).to(accelerator.device)
    gathered = accelerator.gather(packed[None]).cpu().numpy()  # (world, total)
    offset = 0
    for s, vec in zip(stats, local):
        s.merge_deltas(list(gathered[:, offset : offset + vec.size]))
        offset += vec.size


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


# ----------------------------------------------------------------------------- rollout


def observation_dim(space: gym.Space, key: str = "env.id") -> int:
    """The width of the flat float32 row an observation is stored as (``rlprox.spaces``)."""
    return sum(widths(observation_layout(space, key)))


def check_normalize_obs(cfg: EnvConfig, layout: list[dict]) -> None:
    """Images are scaled by 1/255 inside the model; a running normaliser on pixels is refused."""
    images = [describe_entry(e) for e in layout if e["pixels"] is not None]
    if cfg.normalize_obs and images:
        raise RecipeError(
            "env.normalize_obs",
            f"observation normalisation does not apply to image observations ({', '.join(images)}): "
            "the model scales pixels by 1/255 itself; set env.normalize_obs: false",
        )


RESUME_FRESH = (
    "env.backend envpool: resumed from fresh resets (envpool cannot replay the episodes in progress), "
    "so this run no longer equals an uninterrupted one"
)


class GymRollout:
    """One process's share of the experience: ``num_envs`` envs, normalisers, episode
    statistics and the replay state that makes resume exact.

    Per env step a trainer calls ``observe()`` (the normalised current observation,
    updating the observation statistics) and ``step(action)``; after its last step,
    ``last_observation()`` (for the bootstrap value) and ``end_iteration()`` (merges
    normaliser statistics across processes, counts env steps). Seeds: process ``rank``
    resets its envs from ``seed·1000 + 7919·rank``.
    """

    def __init__(self, cfg: EnvConfig, seed: int, rank: int, world: int, gamma: float, accelerator=None):
        self.cfg, self.rank, self.world, self.accelerator = cfg, rank, world, accelerator
        self.envs = make_vec_env(cfg)
        self.num_envs = self.envs.num_envs
        self.layout = observation_layout(self.envs.single_observation_space)
        self.obs_dim = sum(widths(self.layout))
        self.action_space = ActionSpace.of(self.envs.single_action_space)
        check_normalize_obs(cfg, self.layout)
        self.obs_rms = RunningMeanStd((self.obs_dim,)) if cfg.normalize_obs else None
        self.reward_scaler = RewardScaler(self.num_envs, gamma) if cfg.normalize_reward else None
        self.episode_return = np.zeros(self.num_envs, np.float64)
        self.episode_length = np.zeros(self.num_envs, np.int64)
        self.finished: list[tuple[float, int]] = []  # (return, length) of episodes ended this iteration
        self.env_steps = 0  # all processes
        atari = cfg.atari if cfg.preprocessing == "atari" else None
        self.episodic_life = atari is not None and atari.episodic_life
        self.sign_rewards = atari is not None and atari.clip_reward
        self.seed = seed * 1000 + 7919 * rank
        obs, info = self.envs.reset(seed=self.seed)
        self.obs = self.flat(obs)
        self.lives = self.lives_of(info)

    def lives_of(self, info: dict) -> np.ndarray | None:
        """Each env's lives (ALE's ``info["lives"]``) when a lost life ends an episode for training, else None."""
        if not self.episodic_life:
            return None
        if "lives" not in info:
            raise RecipeError("env.atari.episodic_life", f"env {self.cfg.id} reports no lives in its info")
        return np.asarray(info["lives"], np.int64).copy()

    def flat(self, obs, n: int | None = None) -> np.ndarray:
        """(n, obs_dim) float32 rows of a batch of observations (n: the number of envs)."""
        return flatten_batch(self.layout, obs, self.num_envs if n is None else n)

    def normalize(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        return normalize_observation(self.obs_rms, obs, self.cfg.clip_obs, update)

    def begin_iteration(self) -> None:
        self.finished = []

    def observe(self) -> np.ndarray:
        """The normalised current observation (N, obs_dim); updates the statistics."""
        return self.normalize(self.obs, update=True)

    def last_observation(self) -> np.ndarray:
        """The normalised current observation without a statistics update (bootstrap)."""
        return self.normalize(self.obs)

    def step(self, action: np.ndarray):
        """Step every env; returns ``(reward, terminated, done, truncated_idx, final_obs)``:
        rewards scaled when ``normalize_reward``, ``final_obs`` the normalised true last
        observations of the envs in ``truncated_idx`` (for bootstrapping), else None."""
        next_obs, reward, term, trunc, info = self.envs.step(self.action_space.to_env(action))
        self.obs = self.flat(next_obs)
        reward = np.asarray(reward, np.float64)
        done = np.logical_or(term, trunc)
        self.episode_return += reward
        self.episode_length += 1
        for i in np.flatnonzero(done):
            self.finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
            self.episode_return[i] = 0.0
            self.episode_length[i] = 0
        if self.episodic_life:  # ended games reset (their info is the new game's): only the others can lose a life
            lives = self.lives_of(info)
            lost = (lives < self.lives) & ~done
            term, done, self.lives = term | lost, done | lost, lives
        if self.sign_rewards:
            reward = np.sign(reward)
        if self.reward_scaler is not None:
            reward = self.reward_scaler(reward, done, self.cfg.clip_reward)
        truncated = np.flatnonzero(trunc)
        final = None
        if truncated.size:
            final = self.normalize(np.concatenate([self.flat(info["final_obs"][i], 1) for i in truncated]))
        return reward, term, done, truncated, final

    def end_iteration(self, steps_per_env: int) -> None:
        stats = [s for s in (self.obs_rms, self.reward_scaler.rms if self.reward_scaler else None) if s is not None]
        sync_statistics(stats, self.accelerator)
        self.env_steps += steps_per_env * self.num_envs * self.world

    def episode_stats(self) -> dict:
        """This process's finished-episode statistics, with the reduction each key needs
        across processes (``rlprox.engine`` reduces them): returns and lengths are
        means weighted by each process's episode count."""
        n = len(self.finished)
        return {
            "reward/episodes": n,
            "reward/episodic_return": float(np.mean([r for r, _ in self.finished])) if n else float("nan"),
            "reward/episodic_length": float(np.mean([l for _, l in self.finished])) if n else float("nan"),
        }

    REDUCTIONS = {
        "reward/episodes": "sum",
        "reward/episodic_return": "mean:reward/episodes",
        "reward/episodic_length": "mean:reward/episodes",
    }

    def state_dict(self) -> tuple[dict, dict]:
        import torch

        state = {
            "episode_return": self.episode_return.tolist(),
            "episode_length": self.episode_length.tolist(),
            "env_steps": self.env_steps,
            "obs_rms": self.obs_rms.state_dict() if self.obs_rms is not None else None,
            "reward_scaler": self.reward_scaler.state_dict() if self.reward_scaler is not None else None,
            "envs": list(self.envs.call("replay_state")) if self.cfg.backend == "gymnasium" else None,
            "lives": self.lives.tolist() if self.lives is not None else None,
        }
        return {"next_obs": torch.from_numpy(self.obs.copy())}, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.env_steps = int(state["env_steps"])
        load_normalisers(self.obs_rms, self.reward_scaler, state)
        if state["envs"] is None:  # envpool cannot reseed one env: every env starts a new episode
            if self.rank == 0:
                print(f"rlprox: {RESUME_FRESH}", file=sys.stderr)
            obs, info = self.envs.reset(seed=self.seed + 1 + self.env_steps)
            self.obs, self.lives = self.flat(obs), self.lives_of(info)
            return
        self.episode_return = np.asarray(state["episode_return"], np.float64)
        self.episode_length = np.asarray(state["episode_length"], np.int64)
        self.envs.call("restore_replay", state["envs"])
        self.obs = tensors["next_obs"].numpy().copy()
        if self.lives is not None:
            self.lives = np.asarray(state["lives"], np.int64)

    def close(self) -> None:
        self.envs.close()


def normalize_observation(
    rms: RunningMeanStd | None, obs: np.ndarray, clip: float, update: bool = False
) -> np.ndarray:
    if rms is None:
        return obs
    if update:
        rms.update(obs)
    return rms.normalize(obs, clip)


def load_normalisers(obs_rms: RunningMeanStd | None, reward_scaler: RewardScaler | None, state: dict) -> None:
    if obs_rms is not None and state.get("obs_rms"):
        obs_rms.load_state_dict(state["obs_rms"])
    if reward_scaler is not None and state.get("reward_scaler"):
        reward_scaler.load_state_dict(state["reward_scaler"])


def run_episodes(
    cfg: EnvConfig,
    act,
    episodes: int,
    seed: int,
    obs_rms: RunningMeanStd | None = None,
    info_keys: tuple[str, ...] = (),
    record_paths: int = 0,
    on_step=None,
) -> list[dict]:
    """Run ``episodes`` complete episodes of ``act(obs_normalised) -> action`` on up to
    8 fresh envs (reset from ``seed``), with frozen observation statistics; returns
    one dict per episode: ``return``, ``length``, each of ``info_keys`` taken from the
    info of the episode's last step (NaN when absent) and, for the first
    ``record_paths`` episodes, ``path``: the raw observations visited. ``on_step(ended)``
    (optional) gets each step's (n,) bool mask of the envs whose episode just ended (and
    an all-true mask before the first step: every env starts an episode)."""
    n = min(episodes, 8)
    quota = np.full(n, episodes // n) + (np.arange(n) < episodes % n)
    envs = make_vec_env(cfg, num_envs=n, vectorization="sync")
    space = ActionSpace.of(envs.single_action_space)
    layout = observation_layout(envs.single_observation_space)
    obs, _ = envs.reset(seed=seed)
    obs = flatten_batch(layout, obs, n)
    ret, length = np.zeros(n), np.zeros(n, np.int64)
    paths = [[o.tolist()] for o in obs] if record_paths else None
    out: list[dict] = []
    done_count = np.zeros(n, np.int64)
    if on_step is not None:
        on_step(np.ones(n, bool))
    while (done_count < quota).any():
        action = space.to_env(act(normalize_observation(obs_rms, obs, cfg.clip_obs)))
        obs, reward, term, trunc, info = envs.step(action)
        obs = flatten_batch(layout, obs, n)
        ret += reward
        length += 1
        ended = np.logical_or(term, trunc)
        if on_step is not None:
            on_step(ended)
        if paths is not None:
            for i in range(n):
                last = info["final_obs"][i] if ended[i] else obs[i]
                paths[i].append(
                    flatten_batch(layout, last, 1)[0].tolist() if isinstance(last, dict) else last.tolist()
                )
        for i in np.flatnonzero(ended):
            if done_count[i] < quota[i]:
                episode = {"return": float(ret[i]), "length": int(length[i])}
                final = info.get("final_info", {})
                for key in info_keys:
                    has = key in final and final.get(f"_{key}", np.ones(n, bool))[i]
                    episode[key] = float(final[key][i]) if has else float("nan")
                if paths is not None and sum("path" in e for e in out) < record_paths:
                    episode["path"] = paths[i]
                out.append(episode)
                done_count[i] += 1
            ret[i], length[i] = 0.0, 0
            if paths is not None:
                paths[i] = [obs[i].tolist()]
    envs.close()
    return out


# ----------------------------------------------------------------------------- evaluation


def env_goals(cfg: EnvConfig) -> np.ndarray | None:
    """The goal positions of a goal env (an ``unwrapped.goals`` array, as MultiGoal has), else None."""
    probe = _env_factory(cfg, 0)()
    goals = getattr(probe.unwrapped, "goals", None)
    probe.close()
    return None if goals is None else np.asarray(goals, np.float64)


def eval_seed(seed: int, rank: int = 0) -> int:
    """The reset seed of process ``rank``'s evaluation envs (``run_episodes`` resets env
    i from it + i): away from the training envs' seeds, the same for every evaluation."""
    return seed + 1_000_003 + 7919 * rank


START_DRAWS = 1000  # policy draws at the start state for the action-mode count


def evaluate_policy(
    cfg: EnvConfig,
    act,
    request,
    obs_rms: RunningMeanStd | None,
    goals: np.ndarray | None,
    paths: int = 24,
    start_actions=None,
    on_step=None,
):
    """This process's share of an evaluation of ``act`` (an ``EvalShard``): per-episode
    return and length; for goal envs also the goal each episode reached (``_goal``,
    −1 for none; ``goal_summary`` summarises them), a plot of the first ``paths``
    trajectories over the goals and, when the env draws its start state with an
    ``init_std`` spread (MultiGoal), the same episodes again from the exact origin
    (``_origin_goal``). ``start_actions(obs) -> (n, A)`` (optional): the policy's
    draws for n copies of one observation; this shard's share of ``START_DRAWS`` draws at the
    all-zero start state are kept as ``_start_action`` for the action-mode count."""
    from rlprox.runtime import EvalShard, shard

    seed = eval_seed(request.seed, request.rank)
    keys = ("goal",) if goals is not None else ()
    episodes = run_episodes(
        cfg,
        act,
        request.num,
        seed,
        obs_rms,
        info_keys=keys,
        record_paths=paths if goals is not None else 0,
        on_step=on_step,
    )
    values = {"return": [e["return"] for e in episodes], "length": [e["length"] for e in episodes]}
    images = {}
    if goals is not None:
        values["_goal"] = [e["goal"] for e in episodes]
        traced = [e["path"] for e in episodes if "path" in e]
        if traced and len(traced[0][0]) == 2 and request.start < paths:
            images["trajectories"] = render_paths(traced, goals)
        probe = _env_factory(cfg, 0)()
        spread, obs_dim = getattr(probe.unwrapped, "init_std", None), observation_dim(probe.observation_space)
        probe.close()
        if spread is not None:
            origin = dataclasses.replace(cfg, kwargs={**cfg.kwargs, "init_std": 0.0})
            again = run_episodes(origin, act, request.num, seed + 1, obs_rms, keys, on_step=on_step)
            values["_origin_goal"] = [e["goal"] for e in again]
        if start_actions is not None:
            _, n = shard(START_DRAWS, request.rank, request.world)
            zero = normalize_observation(obs_rms, np.zeros((n, obs_dim), np.float32), cfg.clip_obs)
            values["_start_action"] = [list(map(float, a)) for a in start_actions(zero)] if n else []
    return EvalShard(values=values, images=images)


def goal_metrics(goal_ids: list[float], num_goals: int, prefix: str = "") -> dict[str, float]:
    """Multimodality of the goals reached (−1: none): success rate, the fraction of all
    episodes ending at each goal, the entropy of the distribution of reached goals (and
    normalised by log #goals), and coverage: the goals with ≥ 10 % of the hits."""
    ids = np.asarray([g for g in goal_ids if np.isfinite(g)], np.int64)
    hits = ids[ids >= 0]
    counts = np.bincount(hits, minlength=num_goals)[:num_goals].astype(np.float64)
    out = {"success_rate": float(len(hits) / max(len(ids), 1))}
    out.update({f"goal{g}_frac": float(counts[g] / max(len(ids), 1)) for g in range(num_goals)})
    if len(hits):
        p = counts / counts.sum()
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    else:
        p, entropy = counts, 0.0
    out["goal_entropy"] = entropy
    out["goal_entropy_normalized"] = entropy / np.log(num_goals) if num_goals > 1 else 0.0
    out["goal_coverage"] = float((p >= 0.1).sum()) if len(hits) else 0.0
    return {prefix + k: v for k, v in out.items()}


def action_modes(
    actions: np.ndarray, max_k: int = 8, min_silhouette: float = 0.5, min_share: float = 0.1, seed: int = 0
) -> tuple[int, int, float]:
    """(modes, k, silhouette) of a cloud of actions: k-means for k = 1..``max_k``, the k
    with the best silhouette score (k = 1 when no k reaches ``min_silhouette``), and the
    number of its clusters holding ≥ ``min_share`` of the points."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(actions, np.float64).reshape(len(actions), -1)
    best_k, best_score, best_labels = 1, -1.0, np.zeros(len(x), np.int64)
    for k in range(2, min(max_k, len(x) - 1) + 1):
        labels = KMeans(k, n_init=4, random_state=seed).fit_predict(x)
        if len(np.unique(labels)) < 2:
            continue
        score = float(silhouette_score(x, labels))
        if score > best_score:
            best_k, best_score, best_labels = k, score, labels
    if best_score < min_silhouette:
        return 1, 1, best_score
    shares = np.bincount(best_labels, minlength=best_k) / len(x)
    return int((shares >= min_share).sum()), best_k, best_score


def goal_summary(values: dict, num_goals: int) -> dict[str, float]:
    """An env trainer's ``summarize_eval`` on a goal env: ``goal_metrics`` of the goals
    reached, the mean return of the successful episodes (``success_return``), the
    same metrics from the exact origin (``origin_*``) and the number of action modes at
    the start state (``action_modes``, ``action_modes_k``, ``action_modes_silhouette``)."""
    out = goal_metrics(values["_goal"], num_goals)
    won = [r for r, g in zip(values.get("return", []), values["_goal"]) if np.isfinite(g) and g >= 0]
    out["success_return"] = float(np.mean(won)) if won else float("nan")
    if values.get("_origin_goal"):
        out.update(goal_metrics(values["_origin_goal"], num_goals, prefix="origin_"))
    if values.get("_start_action"):
        modes, k, score = action_modes(np.asarray(values["_start_action"]))
        out.update(action_modes=float(modes), action_modes_k=float(k), action_modes_silhouette=score)
    return out


def render_paths(paths: list, goals: np.ndarray, size: int = 320):
    """A (1, 3, H, W) image in [0, 1]: 2-D trajectories over the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, ax = plt.subplots(figsize=(size / 80, size / 80), dpi=80)
    for path in paths:
        xy = np.asarray(path)
        ax.plot(xy[:, 0], xy[:, 1], lw=0.8, alpha=0.7)
    ax.scatter(goals[:, 0], goals[:, 1], s=120, c="red", marker="*", zorder=3)
    lim = max(7.0, float(np.abs(goals).max()) + 1.0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
