"""Pieces every actor-critic trainer on gym envs shares (PPO, PolicyFlow): the config
fields and their checks, the env side (``OnPolicyEnv``: rollout or env probe, rollout
buffers, value bootstrapping at truncation, GAE targets, iteration stats, evaluation,
export, per-process state), one packed tensor per rollout, and minibatches with
advantage moments that are global over processes. A trainer keeps its policy, what it
stores per step and its loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rlprox import objectives
from rlprox.errors import RecipeError
from rlprox.gymenv import (
    ActionSpace,
    GymRollout,
    RewardScaler,
    RunningMeanStd,
    check_normalize_obs,
    env_goals,
    goal_summary,
    load_normalisers,
    make_vec_env,
    validate_env,
)
from rlprox.spaces import is_plain_vector, observation_layout, widths

if TYPE_CHECKING:
    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime


@dataclass
class OnPolicyConfig:
    """Rollout, GAE and clipped-update fields of every actor-critic trainer on gym envs
    (symbols of Schulman et al. 2017); each trainer's config adds its policy's fields."""

    num_steps: int = 128  # rollout length T per env per iteration
    minibatch_size: int = 256  # samples per minibatch, per process
    update_epochs: int = 4  # K epochs over each rollout
    gamma: float = 0.99  # discount γ
    gae_lambda: float = 0.95  # GAE λ
    clip_coef: float = 0.2  # ratio clip range ε
    clip_vloss: bool = True  # clip the value loss with the same ε (PPO2)
    vf_coef: float = 0.5  # value loss coefficient c₁
    ent_coef: float = 0.0  # entropy bonus coefficient c₂
    norm_adv: bool = True  # normalise advantages per minibatch (moments over all processes)
    target_kl: float = 0.0  # stop the epochs once the epoch's mean approx-KL exceeds this; 0 disables


def validate_onpolicy(recipe: "Recipe", section: str) -> None:
    """The env section and the ``OnPolicyConfig`` fields of recipe section ``section``."""
    cfg, env = getattr(recipe, section), recipe.env
    validate_env(env)
    if not 0.0 < cfg.gamma <= 1.0:
        raise RecipeError(f"{section}.gamma", f"must be in (0, 1] (got {cfg.gamma})")
    if not 0.0 <= cfg.gae_lambda <= 1.0:
        raise RecipeError(f"{section}.gae_lambda", f"must be in [0, 1] (got {cfg.gae_lambda})")
    if cfg.clip_coef <= 0:
        raise RecipeError(f"{section}.clip_coef", f"must be > 0 (got {cfg.clip_coef})")
    if cfg.target_kl < 0:
        raise RecipeError(f"{section}.target_kl", f"must be >= 0 (got {cfg.target_kl})")
    rollout = env.num_envs * cfg.num_steps
    if cfg.minibatch_size > rollout or rollout % cfg.minibatch_size:
        raise RecipeError(
            f"{section}.minibatch_size",
            f"{cfg.minibatch_size} must divide the rollout (env.num_envs × {section}.num_steps = {rollout})",
        )


def minibatches_per_epoch(recipe: "Recipe", section: str) -> int:
    cfg = getattr(recipe, section)
    return recipe.env.num_envs * cfg.num_steps // cfg.minibatch_size


def kl_early_stop(target_kl: float):
    """The ``early_stop`` hook: stop the epochs once the epoch's mean approx-KL exceeds
    ``target_kl``; None when ``target_kl`` is 0 (it never fires: no per-epoch stat reduction)."""
    if target_kl <= 0:
        return None
    return lambda epoch_stats: epoch_stats.get("policy/approx_kl", 0.0) > target_kl


def bootstrap_next_values(
    values: np.ndarray, done: np.ndarray, next_values: np.ndarray, last_value: np.ndarray
) -> np.ndarray:
    """V(s_{t+1}) for every step of a (T, N) rollout: the next step's value, except
    where an episode ended (``next_values`` already holds V(final obs) of truncated
    steps, 0 for terminated ones); after the last step, ``last_value`` unless done."""
    cont = done[:-1] == 0
    next_values[:-1][cont] = values[1:][cont]
    next_values[-1] = np.where(done[-1] == 0, last_value, next_values[-1])
    return next_values


class OnPolicyEnv:
    """The env side of an actor-critic trainer on gym envs. When training, this process's
    ``GymRollout`` (its envs, normalisers and episode statistics); for evaluation and
    export, the spaces of one throwaway env and fresh normalisers that ``load_state_dict``
    fills from the checkpoint. It fills the rollout buffers, finds the GAE targets (keeping
    the explained variance for ``iteration_stats``), evaluates and exports a policy, and
    owns the per-process state and the envs' closing."""

    def __init__(self, env_cfg, seed: int, runtime: "Runtime", gamma: float):
        self.cfg = env_cfg
        if runtime.train:
            self.rollout = GymRollout(env_cfg, seed, runtime.rank, runtime.world, gamma, runtime.accelerator)
            self.layout, self.obs_dim, self.space = (
                self.rollout.layout,
                self.rollout.obs_dim,
                self.rollout.action_space,
            )
            self.obs_rms, self.reward_scaler = self.rollout.obs_rms, self.rollout.reward_scaler
        else:
            self.rollout = None
            probe = make_vec_env(env_cfg, num_envs=1, vectorization="sync")
            self.layout = observation_layout(probe.single_observation_space)
            self.obs_dim = sum(widths(self.layout))
            self.space = ActionSpace.of(probe.single_action_space)
            probe.close()
            check_normalize_obs(env_cfg, self.layout)
            self.obs_rms = RunningMeanStd((self.obs_dim,)) if env_cfg.normalize_obs else None
            self.reward_scaler = RewardScaler(1, gamma) if env_cfg.normalize_reward else None
        self.goals = env_goals(env_cfg)
        self.steps_per_env, self.explained_variance = 0, float("nan")
        self._buffers: dict[str, np.ndarray] = {}  # collect's arrays, reused from one rollout to the next

    # ------------------------------------------------------------------ COLLECT
    def collect(self, num_steps: int, act, value, widths: dict[str, int], on_step=None) -> dict:
        """T = ``num_steps`` steps of every env as float32 arrays: ``obs`` (T, N, obs_dim),
        normalised; the fields ``act(obs) -> (env action, {name: array})`` returns, with
        ``widths`` (name → width: (T, N, width), or (T, N) for 0) and ``values`` = V(s)
        among them; then ``next_values`` (V(s_{t+1}) by ``bootstrap_next_values``, with
        ``value(obs)`` = V), ``rewards``, ``terminated`` and ``done``, each (T, N).
        ``on_step(done, truncated_idx)``, when given, is called after each env step, before
        ``value`` sees that step's final observations (a recurrent policy tracks its state).
        The arrays are this object's, overwritten by the next ``collect``: a fresh allocation
        of a pixel rollout's size (115 MB at Atari's 8 × 128 steps) costs more in first-touch
        page faults than the copies into it."""
        rollout = self.rollout
        T, N = num_steps, rollout.num_envs
        shapes = {"obs": (T, N, self.obs_dim), **{name: (T, N, w) if w else (T, N) for name, w in widths.items()}}
        shapes.update({name: (T, N) for name in ("next_values", "rewards", "terminated", "done")})
        if {k: v.shape for k, v in self._buffers.items()} != shapes:
            self._buffers = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        buf = {name: self._buffers[name] for name in ("obs", *widths)}
        next_val, rew_buf, term_buf, done_buf = (
            self._buffers[name] for name in ("next_values", "rewards", "terminated", "done")
        )
        next_val[:] = 0.0  # filled only where an episode is truncated; the rest every step
        rollout.begin_iteration()
        for t in range(T):
            obs_n = rollout.observe()
            action, fields = act(obs_n)
            reward, term, done, truncated, final_obs = rollout.step(action)
            if on_step is not None:
                on_step(done, truncated)
            buf["obs"][t] = obs_n
            for name, x in fields.items():
                buf[name][t] = x
            rew_buf[t], term_buf[t], done_buf[t] = reward, term, done
            if final_obs is not None:  # truncated episodes bootstrap from V(final observation)
                next_val[t, truncated] = value(final_obs)
        bootstrap_next_values(buf["values"], done_buf, next_val, value(rollout.last_observation()))
        rollout.end_iteration(T)
        self.steps_per_env = T
        return {**buf, "next_values": next_val, "rewards": rew_buf, "terminated": term_buf, "done": done_buf}

    # ------------------------------------------------------------------ ADVANTAGE
    def gae(self, batch: dict, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(advantages, returns) of a collected (T, N) rollout by GAE(γ, λ); the explained
        variance of the values, 1 − Var(R − V) / Var(R), is kept for ``iteration_stats``."""
        adv, ret = objectives.gae(
            batch["rewards"], batch["values"], batch["next_values"], batch["terminated"], batch["done"], gamma, lam
        )
        var_ret = ret.var()
        self.explained_variance = (
            float("nan") if var_ret == 0 else float(1.0 - (ret - batch["values"]).var() / var_ret)
        )
        return adv, ret

    # ------------------------------------------------------------------ LOG
    def iteration_stats(self, batch, elapsed: float) -> dict:
        """The trainer's ``iteration_stats``: env steps, steps/s, value quality and the last
        rollout's episode statistics (reduced across processes as ``GymRollout.REDUCTIONS``)."""
        rollout = self.rollout
        stats = {
            "progress/env_steps": rollout.env_steps,
            "perf/sps": self.steps_per_env * rollout.num_envs * rollout.world / max(elapsed, 1e-9),
            "value/explained_variance": self.explained_variance,
        }
        stats.update(rollout.episode_stats())
        return stats

    # ------------------------------------------------------------------ EVALUATE
    def evaluate(
        self, snapshot, request: "EvalRequest", deterministic_default: bool, start_actions=None, on_step=None
    ) -> "EvalShard":
        """The trainer's ``evaluate``: episodes of a numpy policy snapshot (``act(obs, rng,
        deterministic)`` returning the action first) on fresh envs, with its own RNG and
        frozen normalisation statistics (training is never perturbed); goal envs add the
        goals reached, a trajectory plot and the policy's draws at the start state
        (``start_actions(obs, rng)``; default: the sampled action), for
        ``rlprox.gymenv.evaluate_policy``; ``on_step(ended)`` is called after each env step
        (a recurrent policy resets its state where an episode ended)."""
        from rlprox.gymenv import evaluate_policy

        deterministic = deterministic_default if request.deterministic is None else request.deterministic
        rng = np.random.default_rng([request.seed, 10_000 + request.rank])
        draws = np.random.default_rng([request.seed, 20_000 + request.rank])  # the start-state draws' own stream

        def act(obs):
            return snapshot.act(obs, rng, deterministic=deterministic)[0]

        def starts(obs):
            return start_actions(obs, draws) if start_actions is not None else snapshot.act(obs, draws)[0]

        shard = evaluate_policy(
            self.cfg, act, request, self.obs_rms, self.goals, start_actions=starts, on_step=on_step
        )
        shard.info["deterministic"] = deterministic
        return shard

    def summarize_eval(self, values: dict) -> dict:
        """The trainer's ``summarize_eval``: goal envs' goal statistics, else nothing."""
        return goal_summary(values, len(self.goals)) if "_goal" in values else {}

    # ------------------------------------------------------------------ EXPORT
    def export(
        self,
        out_dir,
        module,
        kind: str,
        architecture: dict,
        deterministic_action: str,
        algo: str,
        eval_deterministic: bool,
    ) -> list:
        """The trainer's ``export``: the policy folder ``rlprox.load_policy`` reads
        (``rlprox.policy``): weights, observation statistics and layout (unless a plain
        vector), action space and the rule of its deterministic action; the env is
        recorded for reference."""
        from rlprox.policy import save_policy

        env_cfg, space = self.cfg, self.space
        env = {"id": env_cfg.id, "kwargs": env_cfg.kwargs, "wrappers": env_cfg.wrappers}
        if env_cfg.max_episode_steps:
            env["max_episode_steps"] = env_cfg.max_episode_steps
        if env_cfg.preprocessing == "atari":  # what turns the game's frames into the observations act() takes
            env["preprocessing"], env["atari"] = "atari", dataclasses.asdict(env_cfg.atari)
        return save_policy(
            out_dir,
            module,
            kind,
            architecture,
            self.obs_dim,
            space.config(),
            deterministic_action,
            self.obs_rms.stats() if self.obs_rms is not None else None,
            env_cfg.clip_obs,
            extra={"algo": algo, "env": env, "eval_deterministic": eval_deterministic},
            layout=None if is_plain_vector(self.layout) else self.layout,
        )

    # ------------------------------------------------------------------ STATE
    def state_dict(self) -> tuple[dict, dict]:
        """The trainer's per-process state beyond the weights and the engine's RNG streams:
        the rollout's (tensors, json); nothing outside training."""
        return self.rollout.state_dict() if self.rollout is not None else ({}, {})

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        if self.rollout is not None:
            self.rollout.load_state_dict(tensors, state)
        else:  # evaluation: the normalisation statistics only
            load_normalisers(self.obs_rms, self.reward_scaler, state)

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()


class Columns:
    """Named column blocks of one packed (B, cols) float32 tensor: each minibatch is a
    single ``index_select`` and each field a view. A width of 0 declares a scalar field
    (one column, read back as (B,)); a width w >= 1 a vector field, read back as (B, w)."""

    def __init__(self, widths: dict[str, int]):
        self.slices, self.scalars, start = {}, set(), 0
        self._packed: np.ndarray | None = None  # pack's buffer, reused (see pack)
        for name, width in widths.items():
            if width == 0:
                self.scalars.add(name)
            self.slices[name] = slice(start, start + max(width, 1))
            start += max(width, 1)
        self.width = start

    def slices_widths(self) -> dict[str, int]:
        """name → width as given to the constructor (0 for scalar fields)."""
        return {n: 0 if n in self.scalars else sl.stop - sl.start for n, sl in self.slices.items()}

    def pack(self, arrays: dict[str, np.ndarray], device) -> torch.Tensor:
        """Every field (any shape whose size is B × its width) as one (B, cols) tensor. On the
        CPU the tensor shares this object's buffer, which the next ``pack`` overwrites (as
        ``OnPolicyEnv.collect`` reuses its arrays: one iteration's batch lives until the next)."""
        first = next(iter(self.slices))
        n = np.asarray(arrays[first]).size // (self.slices[first].stop - self.slices[first].start)
        if self._packed is None or self._packed.shape != (n, self.width):
            self._packed = np.empty((n, self.width), np.float32)
        for name, sl in self.slices.items():
            self._packed[:, sl] = np.asarray(arrays[name], np.float32).reshape(n, sl.stop - sl.start)
        return torch.from_numpy(self._packed).to(device)

    def __call__(self, mb: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of a packed minibatch: (B,) for scalar fields, else (B, width)."""
        sl = self.slices[name]
        return mb[:, sl.start] if name in self.scalars else mb[:, sl]


class MinibatchSampler:
    """Epochs of shuffled minibatches of a packed rollout, each with its advantage
    moments. With several processes the moments are the mean and (unbiased) std of the
    minibatch's advantages over all processes, so an N-process update equals a
    1-process update on the concatenated minibatch; the permutations of all epochs are
    drawn at epoch 0 and all their moments found with ONE all-reduce. With one process
    the moments are None (the loss normalises locally)."""

    def __init__(self, runtime, minibatch_size: int, epochs: int, norm_adv: bool):
        self.runtime, self.size, self.epochs, self.norm_adv = runtime, minibatch_size, epochs, norm_adv
        self._plan: list = []

    def chunks(self, rows: int, device) -> list[torch.Tensor]:
        """One epoch's minibatches: row indices of a packed rollout of ``rows`` rows (one permutation draw)."""
        perm = torch.from_numpy(self.runtime.np_rng.permutation(rows)).to(device)
        return [perm[start : start + self.size] for start in range(0, rows, self.size)]

    def __call__(self, packed: torch.Tensor, adv: torch.Tensor, epoch: int):
        rows, device = packed.shape[0], packed.device
        if self.runtime.world == 1 or not self.norm_adv:
            for idx in self.chunks(rows, device):
                yield packed.index_select(0, idx), None
            return
        if epoch == 0:
            chunks = [idx for _ in range(self.epochs) for idx in self.chunks(rows, device)]
            self._plan = list(zip(chunks, self._global_moments(adv, chunks)))
        per_epoch = len(self._plan) // self.epochs
        for idx, moments in self._plan[epoch * per_epoch : (epoch + 1) * per_epoch]:
            yield packed.index_select(0, idx), moments

    def _global_moments(self, adv: torch.Tensor, chunks: list[torch.Tensor]):
        adv64 = adv.double()
        counts = torch.tensor([float(len(i)) for i in chunks], dtype=torch.float64, device=adv.device)
        picked = [adv64.index_select(0, i) for i in chunks]
        sums = torch.stack(
            [torch.stack([x.sum() for x in picked]), torch.stack([(x * x).sum() for x in picked]), counts], 1
        )
        sums = self.runtime.accelerator.reduce(sums, reduction="sum")  # (n_minibatches, 3), all epochs
        n = sums[:, 2]
        mean = sums[:, 0] / n
        std = ((sums[:, 1] - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()
        mean, std = mean.to(adv.dtype), std.to(adv.dtype)
        return [(mean[j], std[j]) for j in range(len(chunks))]


class SequenceSampler(MinibatchSampler):
    """Epochs of minibatches of whole env sequences (recurrent PPO): each epoch shuffles
    the N envs and cuts them into groups of ``envs_per_minibatch``; a minibatch holds all
    T steps of its envs, time-major (row t·n + i: step t of the group's i-th env), so the
    loss can re-run a recurrent model over it. Advantage moments as ``MinibatchSampler``'s:
    over all processes' minibatch j (every process has as many envs), else None."""

    def __init__(self, runtime, num_steps: int, envs_per_minibatch: int, epochs: int, norm_adv: bool):
        super().__init__(runtime, num_steps * envs_per_minibatch, epochs, norm_adv)
        self.num_steps, self.envs = num_steps, envs_per_minibatch

    def chunks(self, rows: int, device) -> list[torch.Tensor]:
        T = self.num_steps
        N = rows // T
        perm = self.runtime.np_rng.permutation(N)
        steps = np.arange(T)[:, None] * N
        return [
            torch.from_numpy((steps + perm[start : start + self.envs][None, :]).reshape(-1)).to(device)
            for start in range(0, N, self.envs)
        ]


def normalized_advantages(adv: torch.Tensor, moments) -> torch.Tensor:
    """Minibatch advantages normalised with the sampler's global moments (or locally)."""
    mean, std = moments if moments is not None else (None, None)
    return objectives.normalize(adv, mean=mean, std=std)
