"""PPO on gymnasium vector envs (Schulman et al. 2017).

Faithful to the implementation details catalogued by Huang et al. (2022, "The 37
implementation details of PPO"): GAE(γ, λ) with truncation bootstrapping,
per-minibatch advantage normalisation, clipped surrogate, clipped value loss,
entropy bonus, orthogonal init, observation and reward normalisation, linear lr
annealing (``optim.schedule: linear``), global grad-norm clipping
(``optim.max_grad_norm``), optional approx-KL early stop.

The engine (rlprox/engine.py) runs the loop; this file only says how to COLLECT,
how to compute ADVANTAGES, and what the LOSS is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from rlprox import objectives

if TYPE_CHECKING:
    from rlprox.recipe import Recipe


@dataclass
class PPOConfig:
    """PPO hyperparameters (symbols of Schulman et al. 2017)."""

    num_steps: int = 128  # rollout length T per env per iteration
    minibatch_size: int = 256  # samples per minibatch, per process
    update_epochs: int = 4  # K epochs over each rollout
    gamma: float = 0.99  # discount γ
    gae_lambda: float = 0.95  # GAE λ
    clip_coef: float = 0.2  # surrogate clip range ε
    clip_vloss: bool = True  # clip the value loss with the same ε (PPO2)
    ent_coef: float = 0.0  # entropy bonus coefficient c₂
    vf_coef: float = 0.5  # value loss coefficient c₁
    norm_adv: bool = True  # normalise advantages per minibatch
    target_kl: float = 0.0  # stop the epochs once the epoch's mean approx-KL exceeds this; 0 disables
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # actor and critic MLP widths
    activation: Literal["tanh", "relu"] = "tanh"
    init_log_std: float = 0.0  # continuous actions: initial log σ
    eval_deterministic: bool = True  # evaluation takes the mode (argmax / mean) of π


def validate(recipe: "Recipe") -> None:
    from rlprox.recipe import RecipeError

    cfg, env = recipe.ppo, recipe.env
    for key in ("num_steps", "minibatch_size", "update_epochs"):
        if getattr(cfg, key) <= 0:
            raise RecipeError(f"ppo.{key}", f"must be > 0 (got {getattr(cfg, key)})")
    if not 0.0 < cfg.gamma <= 1.0:
        raise RecipeError("ppo.gamma", f"must be in (0, 1] (got {cfg.gamma})")
    if not 0.0 <= cfg.gae_lambda <= 1.0:
        raise RecipeError("ppo.gae_lambda", f"must be in [0, 1] (got {cfg.gae_lambda})")
    if cfg.clip_coef <= 0:
        raise RecipeError("ppo.clip_coef", f"must be > 0 (got {cfg.clip_coef})")
    if cfg.target_kl < 0:
        raise RecipeError("ppo.target_kl", f"must be >= 0 (got {cfg.target_kl})")
    if not cfg.hidden_sizes or any(h <= 0 for h in cfg.hidden_sizes):
        raise RecipeError("ppo.hidden_sizes", f"must be a non-empty list of positive widths (got {cfg.hidden_sizes})")
    rollout = env.num_envs * cfg.num_steps
    if cfg.minibatch_size > rollout:
        raise RecipeError("ppo.minibatch_size", f"{cfg.minibatch_size} is larger than the rollout (env.num_envs × ppo.num_steps = {rollout})")
    if rollout % cfg.minibatch_size:
        raise RecipeError("ppo.minibatch_size", f"{cfg.minibatch_size} does not divide the rollout (env.num_envs × ppo.num_steps = {rollout})")
    n_mb = rollout // cfg.minibatch_size
    if n_mb % recipe.run.gradient_accumulation_steps:
        raise RecipeError("run.gradient_accumulation_steps", f"{recipe.run.gradient_accumulation_steps} does not divide the {n_mb} minibatches per epoch")


def build(recipe: "Recipe", accelerator, train: bool = True) -> "PPO":
    return PPO(recipe, accelerator, train=train)


class PPO:
    """collect / advantages / minibatches / loss / evaluate for the engine."""

    curve = ("progress/env_steps", "reward/episodic_return")

    def __init__(self, recipe: "Recipe", accelerator, train: bool = True):
        import gymnasium as gym

        from rlprox.gymenv import RewardScaler, RunningMeanStd, make_vec_env
        from rlprox.models.actor_critic import ActorCritic
        from rlprox.recipe import RecipeError

        self.recipe, self.cfg, self.env_cfg = recipe, recipe.ppo, recipe.env
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.update_epochs = self.cfg.update_epochs
        self.envs = make_vec_env(self.env_cfg) if train else make_vec_env(self.env_cfg, num_envs=1, vectorization="sync")
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise RecipeError("env.id", f"PPO needs a Box observation space (got {obs_space})")
        if isinstance(act_space, gym.spaces.Discrete):
            self.discrete, action_dim, self.action_cols = True, int(act_space.n), 1
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            self.discrete, action_dim, self.action_cols = False, int(act_space.shape[0]), int(act_space.shape[0])
            self.low, self.high = act_space.low, act_space.high
        else:
            raise RecipeError("env.id", f"PPO supports Discrete and 1-D Box action spaces (got {act_space})")
        self.obs_dim = int(np.prod(obs_space.shape))
        self.policy = ActorCritic(self.obs_dim, action_dim, self.discrete, self.cfg.hidden_sizes, self.cfg.activation, self.cfg.init_log_std).to(self.device)
        self.modules = {"policy": self.policy}
        # per-rank streams: each process steps its own envs with its own seed
        self.rng = np.random.default_rng([recipe.seed, self.rank])
        self.obs_rms = RunningMeanStd((self.obs_dim,)) if self.env_cfg.normalize_obs else None
        n = self.envs.num_envs
        self.reward_scaler = RewardScaler(n, self.cfg.gamma) if self.env_cfg.normalize_reward else None
        self.episode_return = np.zeros(n, np.float64)
        self.episode_length = np.zeros(n, np.int64)
        self.finished: list[tuple[float, int]] = []
        self.env_steps = 0  # global, all processes
        if train:
            obs, _ = self.envs.reset(seed=recipe.seed * 1000 + 7919 * self.rank)
            self.next_obs = self._flat(obs)
        else:
            self.envs.close()
            self.envs = None

    def _flat(self, obs) -> np.ndarray:
        return np.asarray(obs, np.float32).reshape(len(obs), self.obs_dim)

    def _norm(self, obs: np.ndarray, update: bool) -> np.ndarray:
        if self.obs_rms is None:
            return obs
        if update:
            self.obs_rms.update(obs)
        return self.obs_rms.normalize(obs, self.env_cfg.clip_obs)

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.modules["policy"])

    # ------------------------------------------------------------------ COLLECT
    def collect(self):
        policy = self._unwrapped().snapshot()
        T, N, D = self.cfg.num_steps, self.envs.num_envs, self.obs_dim
        obs_buf = np.zeros((T, N, D), np.float32)
        act_buf = np.zeros((T, N, self.action_cols), np.float32)
        logp_buf = np.zeros((T, N), np.float32)
        val_buf = np.zeros((T, N), np.float32)
        next_val = np.zeros((T, N), np.float32)
        rew_buf = np.zeros((T, N), np.float32)
        term_buf = np.zeros((T, N), np.float32)
        done_buf = np.zeros((T, N), np.float32)
        self.finished = []
        self._collect_start = time.perf_counter()
        obs = self.next_obs
        for t in range(T):
            obs_n = self._norm(obs, update=True)
            action, logp, value = policy.act(obs_n, self.rng)
            env_action = action if self.discrete else np.clip(action, self.low, self.high)
            next_obs, reward, term, trunc, info = self.envs.step(env_action)
            next_obs = self._flat(next_obs)
            reward = np.asarray(reward, np.float64)
            done = np.logical_or(term, trunc)
            self.episode_return += reward
            self.episode_length += 1
            for i in np.flatnonzero(done):
                self.finished.append((float(self.episode_return[i]), int(self.episode_length[i])))
                self.episode_return[i] = 0.0
                self.episode_length[i] = 0
            if self.reward_scaler is not None:
                reward = self.reward_scaler(reward, done, self.env_cfg.clip_reward)
            obs_buf[t], act_buf[t] = obs_n, action.reshape(N, -1)
            logp_buf[t], val_buf[t], rew_buf[t] = logp, value, reward
            term_buf[t], done_buf[t] = term, done
            if trunc.any():  # truncated episodes bootstrap from V(final observation)
                idx = np.flatnonzero(trunc)
                final = self._flat(np.stack([info["final_obs"][i] for i in idx]))
                next_val[t, idx] = policy.value(self._norm(final, update=False))
            obs = next_obs
        self.next_obs = obs
        last_value = policy.value(self._norm(obs, update=False))
        # V(s_{t+1}) is the next step's value, except where an episode ended
        cont = done_buf[:-1] == 0
        next_val[:-1][cont] = val_buf[1:][cont]
        next_val[-1] = np.where(done_buf[-1] == 0, last_value, next_val[-1])
        if self.obs_rms is not None:
            self.obs_rms.sync(self.accelerator)
        if self.reward_scaler is not None:
            self.reward_scaler.rms.sync(self.accelerator)
        self.env_steps += T * N * self.world
        return {"obs": obs_buf, "actions": act_buf, "logp": logp_buf, "values": val_buf, "next_values": next_val, "rewards": rew_buf, "terminated": term_buf, "done": done_buf}

    # ------------------------------------------------------------------ ADVANTAGE
    def advantages(self, batch):
        adv, ret = objectives.gae(batch["rewards"], batch["values"], batch["next_values"], batch["terminated"], batch["done"], self.cfg.gamma, self.cfg.gae_lambda)
        var_ret = ret.var()
        self._explained_variance = float("nan") if var_ret == 0 else float(1.0 - (ret - batch["values"]).var() / var_ret)
        B = adv.size
        # one packed (B, cols) tensor: each minibatch is a single index_select
        packed = np.concatenate(
            [batch["obs"].reshape(B, -1), batch["actions"].reshape(B, -1), batch["logp"].reshape(B, 1), batch["values"].reshape(B, 1), adv.reshape(B, 1).astype(np.float32), ret.reshape(B, 1).astype(np.float32)],
            axis=1,
        )
        return torch.from_numpy(packed).to(self.device)

    def minibatches(self, packed: torch.Tensor, epoch: int):
        B, size = packed.shape[0], self.cfg.minibatch_size
        perm = torch.from_numpy(self.rng.permutation(B)).to(self.device)
        for start in range(0, B, size):
            yield packed.index_select(0, perm[start : start + size])

    # ------------------------------------------------------------------ LOSS
    def loss(self, mb: torch.Tensor):
        D, A = self.obs_dim, self.action_cols
        obs, actions = mb[:, :D], mb[:, D : D + A]
        old_logp, old_values, adv, returns = mb[:, D + A], mb[:, D + A + 1], mb[:, D + A + 2], mb[:, D + A + 3]
        if self.discrete:
            actions = actions[:, 0]
        logp, entropy, values = self.modules["policy"](obs, actions)
        if self.cfg.norm_adv:
            mean, std = self._global_moments(adv)
            adv = objectives.normalize(adv, mean=mean, std=std)
        pg_loss, ratio = objectives.clipped_surrogate(logp, old_logp, adv, self.cfg.clip_coef)
        v_loss = objectives.value_loss(values, returns, old_values, self.cfg.clip_coef if self.cfg.clip_vloss else None)
        entropy = entropy.mean()
        loss = pg_loss - self.cfg.ent_coef * entropy + self.cfg.vf_coef * v_loss
        with torch.no_grad():
            stats = {
                "loss/policy": pg_loss.detach(),
                "loss/value": v_loss.detach(),
                "policy/entropy": entropy.detach(),
                "policy/approx_kl": objectives.approx_kl(logp, old_logp),
                "policy/clip_frac": objectives.clip_fraction(ratio, self.cfg.clip_coef),
                "policy/ratio_max": ratio.max(),
            }
        return loss, stats

    def _global_moments(self, x: torch.Tensor):
        """Mean and (unbiased) std of x over all processes' minibatches, so a 2-process
        update equals a 1-process update on the concatenated minibatch."""
        if self.world == 1:
            return None, None
        x64 = x.detach().double()  # sum-of-squares in float64: no drift from x.std()
        s = torch.stack([x64.sum(), (x64 * x64).sum(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
        s = self.accelerator.reduce(s, reduction="sum")
        n = s[2]
        mean = s[0] / n
        var = (s[1] - n * mean * mean) / (n - 1)
        return mean.to(x.dtype), var.clamp_min(0).sqrt().to(x.dtype)

    def early_stop(self, epoch_stats: dict) -> bool:
        return self.cfg.target_kl > 0 and epoch_stats.get("policy/approx_kl", 0.0) > self.cfg.target_kl

    # ------------------------------------------------------------------ LOG
    def iteration_stats(self, elapsed: float) -> dict:
        finished = self.finished
        if self.world > 1:
            from accelerate.utils import gather_object

            finished = gather_object(finished)
        stats = {
            "progress/env_steps": self.env_steps,
            "perf/sps": self.cfg.num_steps * self.envs.num_envs * self.world / max(elapsed, 1e-9),
            "value/explained_variance": self._explained_variance,
        }
        if finished:
            stats["reward/episodic_return"] = float(np.mean([r for r, _ in finished]))
            stats["reward/episodic_length"] = float(np.mean([n for _, n in finished]))
            stats["reward/episodes"] = len(finished)
        return stats

    # ------------------------------------------------------------------ EVALUATE
    def evaluate(self, episodes: int, deterministic: bool | None = None, seed: int | None = None) -> dict:
        """Mean episodic return of the current policy on fresh envs. Uses its own RNG
        and frozen normalisation statistics, so it never perturbs training."""
        from rlprox.gymenv import make_vec_env

        deterministic = self.cfg.eval_deterministic if deterministic is None else deterministic
        n = min(episodes, 8)
        quota = np.full(n, episodes // n) + (np.arange(n) < episodes % n)
        envs = make_vec_env(self.env_cfg, num_envs=n, vectorization="sync")
        rng = np.random.default_rng([self.recipe.seed if seed is None else seed, 10_000 + self.rank])
        policy = self._unwrapped().snapshot()
        obs, _ = envs.reset(seed=(self.recipe.seed if seed is None else seed) + 1_000_003)
        obs = self._flat(obs)
        ret, length = np.zeros(n), np.zeros(n, np.int64)
        returns, lengths = [], []
        done_count = np.zeros(n, np.int64)
        while (done_count < quota).any():
            action, _, _ = policy.act(self._norm(obs, update=False), rng, deterministic=deterministic)
            if not self.discrete:
                action = np.clip(action, self.low, self.high)
            obs, reward, term, trunc, _ = envs.step(action)
            obs = self._flat(obs)
            ret += reward
            length += 1
            for i in np.flatnonzero(np.logical_or(term, trunc)):
                if done_count[i] < quota[i]:
                    returns.append(float(ret[i]))
                    lengths.append(int(length[i]))
                    done_count[i] += 1
                ret[i], length[i] = 0.0, 0
        envs.close()
        self.last_eval = {"returns": returns, "lengths": lengths}
        return {
            "eval/return": float(np.mean(returns)),
            "eval/return_std": float(np.std(returns)),
            "eval/length": float(np.mean(lengths)),
            "eval/episodes": len(returns),
        }

    @torch.no_grad()
    def model_stats(self) -> dict:
        """Neuron sparsity of the actor's hidden layers: a neuron whose incoming weight
        row is exactly zero outputs a constant and can be folded into the next layer.
        Reported for recipes with regularizers."""
        if not self.recipe.regularizers:
            return {}
        hidden = [m for m in self._unwrapped().actor if isinstance(m, torch.nn.Linear)][:-1]
        zero = [int(m.weight.abs().sum(1).eq(0).sum()) for m in hidden]
        total = [m.out_features for m in hidden]
        stats = {f"sparsity/actor_layer{i}_zero_neurons": z for i, z in enumerate(zero)}
        stats["sparsity/actor_hidden_neurons_zero_fraction"] = sum(zero) / sum(total)
        return stats

    # ------------------------------------------------------------------ STATE
    def state_dict(self):
        """Per-process state beyond the weights: (tensors, json)."""
        state = {
            "rng": self.rng.bit_generator.state,
            "episode_return": self.episode_return.tolist(),
            "episode_length": self.episode_length.tolist(),
            "env_steps": self.env_steps,
            "obs_rms": self.obs_rms.state_dict() if self.obs_rms is not None else None,
            "reward_scaler": self.reward_scaler.state_dict() if self.reward_scaler is not None else None,
        }
        tensors = {}
        if self.envs is not None:
            state["envs"] = list(self.envs.call("replay_state"))
            tensors["next_obs"] = torch.from_numpy(self.next_obs.copy())
        return tensors, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.env_steps = int(state["env_steps"])
        if self.obs_rms is not None and state.get("obs_rms"):
            self.obs_rms.load_state_dict(state["obs_rms"])
        if self.reward_scaler is not None and state.get("reward_scaler"):
            self.reward_scaler.load_state_dict(state["reward_scaler"])
        if self.envs is not None and "envs" in state:
            self.episode_return = np.asarray(state["episode_return"], np.float64)
            self.episode_length = np.asarray(state["episode_length"], np.int64)
            self.envs.call("restore_replay", state["envs"])
            self.next_obs = tensors["next_obs"].numpy().copy()

    def close(self):
        if self.envs is not None:
            self.envs.close()
