"""``env.backend: envpool``: envpool's C++ vector envs behind the interface of gymnasium's.

``EnvpoolVectorEnv`` steps all of a process's envs in one call and gives the rollout what
a gymnasium ``SyncVectorEnv`` in SAME_STEP autoreset mode gives: the step that ends an
episode returns the next episode's first observation, with the true last one in
``info["final_obs"]``. envpool itself resets an env on the step *after* its end (that
step's action is ignored), so the adapter steps just the ended envs once more, at once,
to fetch their first observations: every transition the trainer stores is a real one.

The ids are gymnasium's without the ``ALE/`` prefix (``ALE/Breakout-v5`` → ``Breakout-v5``;
``Hopper-v5``); Atari envs are always preprocessed by envpool itself, configured from
``env.atari`` to give the frames gymnasium's ``AtariPreprocessing`` gives (fire reset,
episodic life and reward clipping off: the rollout does the last two). ``env.kwargs`` go
to ``envpool.make`` as they are (e.g. ``num_threads``).

What envpool cannot do: reseed one env (env i of a pool seeded s runs from seed s + i,
once), so exact resume, which replays each env's current episode from its reset seed, is
not possible; a resumed run starts every env on a new episode and says so. Videos
(``rlprox eval --video``) render through gymnasium.
"""

from __future__ import annotations

import difflib

import numpy as np

from rlprox.errors import RecipeError

EXTRA = "envpool"
ALE_PREFIX = "ALE/"
FRAMES_PER_GAME = 108_000  # ALE v5's frame limit per game (27,000 agent steps at frame skip 4)


def task_id(env_id: str) -> str:
    return env_id[len(ALE_PREFIX) :] if env_id.startswith(ALE_PREFIX) else env_id


def import_envpool(key: str):
    try:
        import envpool
    except ImportError as err:
        raise RecipeError(key, f"env.backend envpool needs envpool (pip install 'rlprox[{EXTRA}]'): {err}") from None
    return envpool


def is_atari(envpool, task: str) -> bool:
    return hasattr(envpool.make_spec(task).config, "noop_max")


def validate_envpool(cfg, key: str = "env") -> None:
    """The recipe's env on envpool: installed, an id envpool has, no gymnasium wrappers,
    Atari ids with ``preprocessing: atari``."""
    envpool = import_envpool(f"{key}.backend")
    if ":" in cfg.id:
        raise RecipeError(f"{key}.id", f"env.backend envpool runs envpool's own ids, not {cfg.id!r}")
    if cfg.wrappers:
        raise RecipeError(f"{key}.wrappers", "gymnasium wrappers do not apply to env.backend envpool")
    task, known = task_id(cfg.id), envpool.list_all_envs()
    if task not in known:
        close = difflib.get_close_matches(task, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{key}.id", f"envpool has no env {task!r}{hint}")
    atari = is_atari(envpool, task)
    if atari and cfg.preprocessing != "atari":
        raise RecipeError(
            f"{key}.preprocessing", f"envpool's Atari env {task} is always preprocessed: set env.preprocessing: atari"
        )
    if not atari and cfg.preprocessing == "atari":
        raise RecipeError(f"{key}.preprocessing", f"atari preprocessing needs an Atari id (envpool's {task} is not)")


def make_kwargs(cfg, atari: bool) -> dict:
    """``envpool.make``'s options for the recipe's env."""
    kwargs = {}
    if atari:
        opts = cfg.atari
        kwargs = {
            "noop_max": max(opts.noop_max, 1),  # envpool draws 0..N-1 no-ops (and crashes at 0)
            "frame_skip": opts.frame_skip,
            "img_height": opts.screen_size,
            "img_width": opts.screen_size,
            "stack_num": opts.frame_stack,
            "gray_scale": opts.grayscale,
            "repeat_action_probability": opts.repeat_action_probability,
            "episodic_life": False,
            "reward_clip": False,
            "use_fire_reset": False,
            "max_episode_steps": cfg.max_episode_steps or FRAMES_PER_GAME // opts.frame_skip,
        }
    elif cfg.max_episode_steps:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    return {**kwargs, **cfg.kwargs}


class EnvpoolVectorEnv:
    """``num_envs`` envpool envs with a gymnasium SAME_STEP vector env's ``reset`` / ``step``
    (see module doc). The pool is rebuilt by ``reset(seed=s)`` for a new seed."""

    def __init__(self, cfg, num_envs: int):
        self.envpool = import_envpool("env.backend")
        self.cfg, self.num_envs, self.task = cfg, num_envs, task_id(cfg.id)
        self.kwargs = make_kwargs(cfg, is_atari(self.envpool, self.task))
        self.seed = None
        self.pool = self._make(0)
        self.single_observation_space = self.pool.observation_space
        self.single_action_space = self.pool.action_space

    def _make(self, seed: int):
        self.seed = seed
        return self.envpool.make(
            self.task, env_type="gymnasium", num_envs=self.num_envs, seed=int(seed), **self.kwargs
        )

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None and seed != self.seed:
            self.pool.close()
            self.pool = self._make(seed)
        obs, info = self.pool.reset()
        return obs, self._info(info)

    def step(self, actions):
        actions = np.asarray(actions)
        obs, reward, term, trunc, info = self.pool.step(actions)
        out = self._info(info)
        ended = np.flatnonzero(np.logical_or(term, trunc))
        if ended.size:  # step the ended envs once more: envpool resets them, ignoring the action
            final = np.empty(self.num_envs, dtype=object)
            for i in ended:
                final[i] = obs[i].copy()
            first, _, _, _, first_info = self.pool.step(actions[ended], ended.astype(np.int32))
            rows = np.asarray(first_info["env_id"])
            obs = obs.copy()
            obs[rows] = first
            if "lives" in out:
                out["lives"][rows] = first_info["lives"]
            out["final_obs"], out["_final_obs"] = final, np.logical_or(term, trunc)
        return obs, reward, term, trunc, out

    @staticmethod
    def _info(info: dict) -> dict:
        return {"lives": np.asarray(info["lives"]).copy()} if "lives" in info else {}

    def close(self) -> None:
        self.pool.close()
