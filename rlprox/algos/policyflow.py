"""PolicyFlow: PPO with a flow-matching (CNF) policy, the velocity-difference importance
ratio and the Brownian regularizer ("PolicyFlow: Policy Optimization with Continuous
Normalizing Flow in Reinforcement Learning", arXiv 2602.01156).

Policy (rlprox/models/flow_policy.py): a = φ₁(z; s) + n, z ~ N(0, I), n ~ N(0, σ²);
φ the K-step midpoint flow of v_θ from noise (t = 0) to action (t = 1).

    COLLECT    the shared gym rollout (rlprox.onpolicy.OnPolicyEnv), storing s, z, φ̂₁,
               δ = a − φ̂₁ (before env clipping), log N(δ; 0, σ̂²), V(s).
    ADVANTAGE  GAE(γ, λ); then one t per sample (the K-point grid by default),
               x_t = (1 − t)·z + t·φ̂₁ and v̂ = v(x_t, t, s) at the rollout parameters.
    UPDATE     epochs × minibatches of
                   log ρ = Σ_i log N(δ_i; δv_i, σ_i²) − Σ_i log N(δ_i; 0, σ̂_i²),  δv = v_θ(x_t) − v̂(x_t)
                   J = E[min(ρA, clip(ρ, 1±ε)A)] − w_b·mean(η_t²) + w_g·H(N(0, σ²)) − c_v·L_V
               (ρ ≡ 1 at the first minibatch; η_t the Brownian residual, its score term
               rescaled by the base noise std s = noise_scale, mean over batch and action
               dimensions; a loss-side
               regularizer of the shared core: ``regularizers: [{type: brownian, lam: w_b}]``).

``ratio: fpo`` swaps in FPO's estimator (McAllister et al. 2025): with N stored pairs
(τ_j, ε_j) and the conditional flow-matching loss ℓ(τ, ε) = mean_i (v(x_τ, τ, s) −
(a − ε))_i², x_τ = (1 − τ)·ε + τ·a, ρ = exp(mean_j ℓ_old − mean_j ℓ_θ); σ then stays at
its initial value (it is not part of that ratio).

Actor and critic take separate learning rates through the engine's parameter groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from rlprox import objectives
from rlprox.algos import TrainerSpec, register_trainer
from rlprox.errors import RecipeError
from rlprox.gymenv import EnvConfig, GymRollout
from rlprox.onpolicy import (
    Columns,
    MinibatchSampler,
    OnPolicyConfig,
    OnPolicyEnv,
    kl_early_stop,
    minibatches_per_epoch,
    normalized_advantages,
    validate_onpolicy,
)
from rlprox.spaces import has_images

if TYPE_CHECKING:
    from pathlib import Path

    from rlprox.prox.attach import LossTerms
    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime


@dataclass
class PolicyFlowConfig(OnPolicyConfig):
    """PolicyFlow hyperparameters: PPO's rollout and update fields (``OnPolicyConfig``;
    ``ent_coef`` is w_g, the entropy bonus of the Gaussian head N(0, σ²)), then the flow's."""

    ratio: Literal["velocity", "fpo"] = (
        "velocity"  # PolicyFlow's velocity-difference ratio, or FPO's flow-matching-loss ratio
    )
    flow_steps: int = 10  # K midpoint (RK2) steps from noise to action
    # std of the flow's base noise, z ~ N(0, s² I); the flow starts
    # near the identity, so the initial action spread is ≈ s (plus σ)
    noise_scale: float = 1.0
    # t per sample (ratio fpo: τ per pair): grid, the K points {k/K, k < K} (FPO's default); midpoint_grid,
    # the released PolicyFlow code's 2K+1 points {j/(2K), j = 0..2K} (the K grid, its midpoints and t = 1);
    # or uniform, U(0, 1)
    t_sampling: Literal["grid", "midpoint_grid", "uniform"] = "grid"
    fpo_samples: int = 8  # ratio fpo: N (τ, ε) pairs per sample
    # ratio fpo: the conditional flow-matching loss, on the velocity ((v − (a − ε))²) or, as FPO's
    # code trains it, on the noise ε̂ = x_τ − τ·v, which is the velocity loss weighted by τ²
    fpo_loss: Literal["velocity", "eps"] = "velocity"
    # a = φ₁(z) + n with n ~ N(0, σ²); false: a = φ₁(z) (no head, as FPO; needs ratio fpo and ent_coef 0)
    gaussian_head: bool = True
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # velocity MLP widths
    critic_sizes: list[int] = field(default_factory=lambda: [64, 64])  # critic MLP widths
    activation: Literal["tanh", "relu"] = "tanh"  # hidden nonlinearity of the velocity and critic MLPs
    time_features: int = 4  # Fourier frequencies of t (2^k, k < time_features)
    obs_embed: int = 32  # observation embedding width
    init_log_std: float = -1.0  # initial log σ of the Gaussian head
    log_std_min: float = -5.0  # lower bound of the Gaussian head's log σ
    log_std_max: float = 0.5  # upper bound of the Gaussian head's log σ
    last_layer_scale: float = 0.01  # init gain of the velocity MLP's last layer (flow ≈ identity at start)
    critic_lr: float = 0.0  # the critic's lr (0: optim.lr)
    eval_deterministic: bool = (
        False  # evaluate with z = 0 and no Gaussian noise (False: sample, as multimodality needs)
    )


def validate(recipe: "Recipe") -> None:
    validate_onpolicy(recipe, "policyflow")
    cfg = recipe.policyflow
    if cfg.noise_scale <= 0:
        raise RecipeError("policyflow.noise_scale", f"must be > 0 (got {cfg.noise_scale})")
    if not cfg.gaussian_head and cfg.ratio != "fpo":
        raise RecipeError("policyflow.gaussian_head", "false needs ratio: fpo (the velocity ratio scores the head)")
    if not cfg.gaussian_head and cfg.ent_coef:
        raise RecipeError("policyflow.ent_coef", f"must be 0 without a Gaussian head (got {cfg.ent_coef})")
    if cfg.fpo_loss != "velocity" and cfg.ratio != "fpo":
        raise RecipeError("policyflow.fpo_loss", f"applies to ratio: fpo only (ratio is {cfg.ratio})")
    if not cfg.log_std_min < cfg.init_log_std < cfg.log_std_max:
        raise RecipeError(
            "policyflow.init_log_std",
            f"must lie strictly between log_std_min {cfg.log_std_min} "
            f"and log_std_max {cfg.log_std_max} (got {cfg.init_log_std})",
        )


class PolicyFlow:
    """collect / advantages / minibatches / loss / evaluate for the engine."""

    curve = ("progress/env_steps", "reward/episodic_return")
    stat_reductions = GymRollout.REDUCTIONS

    def __init__(self, recipe: "Recipe", runtime: "Runtime", loss_terms: "LossTerms | None" = None):
        from rlprox.models.flow_policy import FlowPolicy
        from rlprox.prox.attach import LossTerms

        self.loss_terms = loss_terms or LossTerms()
        cfg = self.cfg = recipe.policyflow
        self.recipe, self.env_cfg, self.runtime = recipe, recipe.env, runtime
        self.device = runtime.device
        self.rng = runtime.np_rng
        self.update_epochs = cfg.update_epochs
        self.early_stop = kl_early_stop(cfg.target_kl)
        env = self.env = OnPolicyEnv(self.env_cfg, recipe.seed, runtime, cfg.gamma)
        # the env side's hooks: rollout stats, goal summaries, per-process state, closing the envs
        self.iteration_stats, self.summarize_eval = env.iteration_stats, env.summarize_eval
        self.state_dict, self.load_state_dict, self.close = env.state_dict, env.load_state_dict, env.close
        obs_dim, space = env.obs_dim, env.space
        if space.kind != "box":
            raise RecipeError("env.id", "PolicyFlow needs a continuous (Box) action space")
        if env.layout[0]["key"] is not None or has_images(env.layout):
            env.close()
            raise RecipeError("env.id", "PolicyFlow takes a vector Box observation (images and Dicts: use ppo)")
        self.obs_dim, self.action_dim = obs_dim, space.dim
        self.policy = FlowPolicy(
            obs_dim,
            space.dim,
            cfg.hidden_sizes,
            cfg.activation,
            cfg.time_features,
            cfg.obs_embed,
            cfg.critic_sizes,
            cfg.init_log_std,
            (cfg.log_std_min, cfg.log_std_max),
            cfg.last_layer_scale,
        )
        if cfg.ratio == "fpo":
            self.policy.log_std_param.requires_grad_(False)  # σ is not part of FPO's ratio
        self.modules = {"policy": self.policy}
        A, N = space.dim, cfg.fpo_samples
        widths = {
            "obs": obs_dim,
            "delta": A,
            "log_std_old": A,
            "logp": 0,
            "values": 0,
            "advantages": 0,
            "returns": 0,
            "t": 0,
            "x_t": A,
            "v_hat": A,
        }
        if cfg.ratio == "fpo":
            widths.update({"action": A, "tau": N, "eps": N * A, "cfm_old": N})
        self.columns = Columns(widths)
        self.sampler = MinibatchSampler(runtime, cfg.minibatch_size, cfg.update_epochs, cfg.norm_adv)

    def _unwrapped(self):
        return self.runtime.unwrap(self.modules["policy"])

    def param_groups(self) -> list[dict]:
        policy = self._unwrapped()
        critic = list(policy.critic.parameters())
        actor = [p for p in policy.parameters() if p.requires_grad and all(p is not q for q in critic)]
        critic_group = {"params": critic}
        if self.cfg.critic_lr > 0:
            critic_group["lr"] = self.cfg.critic_lr
        return [{"params": actor}, critic_group]

    # ------------------------------------------------------------------ COLLECT
    def collect(self):
        cfg, A = self.cfg, self.action_dim
        policy = self._unwrapped().snapshot(cfg.flow_steps, cfg.noise_scale, cfg.gaussian_head)

        def act(obs):
            action, z, phi, delta, logp, value = policy.act(obs, self.rng)
            return action, {"z": z, "phi": phi, "delta": delta, "logp": logp, "values": value}

        widths = {"z": A, "phi": A, "delta": A, "logp": 0, "values": 0}
        batch = self.env.collect(cfg.num_steps, act, policy.value, widths)
        self._log_std = policy.log_std
        return batch

    # ------------------------------------------------------------------ ADVANTAGE
    def advantages(self, batch):
        cfg = self.cfg
        adv, ret = self.env.gae(batch, cfg.gamma, cfg.gae_lambda)
        B, A = adv.size, self.action_dim
        obs, z, phi, delta = (batch[k].reshape(B, -1) for k in ("obs", "z", "phi", "delta"))
        t = self._flow_times(B)
        x_t = (1.0 - t[:, None]) * z + t[:, None] * phi
        policy = self._unwrapped()
        obs_t = torch.from_numpy(obs).to(self.device)
        with torch.no_grad():
            v_hat = (
                policy.velocity_field(
                    torch.from_numpy(x_t).to(self.device), torch.from_numpy(t).to(self.device), obs_t
                )
                .cpu()
                .numpy()
            )
        fields = {
            "obs": obs,
            "delta": delta,
            "log_std_old": np.broadcast_to(self._log_std, (B, A)),
            "logp": batch["logp"],
            "values": batch["values"],
            "advantages": adv,
            "returns": ret,
            "t": t,
            "x_t": x_t,
            "v_hat": v_hat,
        }
        if cfg.ratio == "fpo":
            n = cfg.fpo_samples
            action = phi + delta
            tau = self._flow_times((B, n))
            eps = self.rng.standard_normal((B, n, A)).astype(np.float32)
            with torch.no_grad():
                cfm_old = (
                    self._cfm_losses(
                        policy,
                        obs_t,
                        torch.from_numpy(action).to(self.device),
                        torch.from_numpy(tau).to(self.device),
                        torch.from_numpy(eps).to(self.device),
                    )
                    .cpu()
                    .numpy()
                )
            fields.update(action=action, tau=tau, eps=eps, cfm_old=cfm_old)
        return self.columns.pack(fields, self.device)

    def _flow_times(self, shape) -> np.ndarray:
        """Flow times t (or FPO's τ): the K-point grid {k/K, k < K}, the 2K+1-point grid {j/(2K)}
        or U(0, 1)."""
        K = self.cfg.flow_steps
        if self.cfg.t_sampling == "grid":
            return self.rng.integers(K, size=shape).astype(np.float32) / K
        if self.cfg.t_sampling == "midpoint_grid":
            return self.rng.integers(2 * K + 1, size=shape).astype(np.float32) / (2 * K)
        return self.rng.random(shape).astype(np.float32)

    def _cfm_losses(self, model, obs, action, tau, eps, velocity=None):
        """ℓ(τ_j, ε_j) = w(τ)·mean_i (v(x_τ, τ, s) − (a − ε))_i², x_τ = (1 − τ)·ε + τ·a: (B, N);
        w = 1 (``fpo_loss: velocity``) or τ² (``eps``: the error of ε̂ = x_τ − τ·v, FPO's loss)."""
        B, N, A = eps.shape
        x_tau = (1.0 - tau[..., None]) * eps + tau[..., None] * action[:, None]
        obs_rep = obs[:, None].expand(B, N, obs.shape[-1]).reshape(B * N, -1)
        v = (velocity or model.velocity_field)(x_tau.reshape(B * N, A), tau.reshape(-1), obs_rep)
        loss = (v.reshape(B, N, A) - (action[:, None] - eps)).pow(2).mean(-1)
        return loss * tau.pow(2) if self.cfg.fpo_loss == "eps" else loss

    def minibatches(self, packed: torch.Tensor, epoch: int):
        return self.sampler(packed, self.columns(packed, "advantages"), epoch)

    # ------------------------------------------------------------------ LOSS
    def loss(self, minibatch):
        cfg, col = self.cfg, self.columns
        mb, moments = minibatch
        obs, delta, x_t, t, v_hat = col(mb, "obs"), col(mb, "delta"), col(mb, "x_t"), col(mb, "t"), col(mb, "v_hat")
        v, values, log_std = self.modules["policy"](x_t, t, obs)
        if cfg.ratio == "velocity":
            log_rho = objectives.flow_log_ratio(delta, v - v_hat, log_std, col(mb, "log_std_old"))
        else:
            B, N, A = len(mb), cfg.fpo_samples, self.action_dim
            policy = self._unwrapped()
            cfm = self._cfm_losses(
                policy,
                obs,
                col(mb, "action"),
                col(mb, "tau"),
                col(mb, "eps").reshape(B, N, A),
                velocity=lambda x, tt, s: self.modules["policy"](x, tt, s)[0],
            )
            log_rho = (col(mb, "cfm_old") - cfm).mean(-1)
        adv = col(mb, "advantages")
        if cfg.norm_adv:
            adv = normalized_advantages(adv, moments)
        zeros = torch.zeros_like(log_rho)
        pg_loss, ratio = objectives.clipped_surrogate(log_rho, zeros, adv, cfg.clip_coef)
        v_loss = objectives.value_loss(
            values, col(mb, "returns"), col(mb, "values"), cfg.clip_coef if cfg.clip_vloss else None
        )
        entropy = objectives.gaussian_entropy(log_std)
        penalty, penalty_stats = self.loss_terms(v=v, v_hat=v_hat, x_t=x_t, t=t, base_std=cfg.noise_scale)
        loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss + penalty
        with torch.no_grad():
            stats = {
                "loss/policy": pg_loss.detach(),
                "loss/value": v_loss.detach(),
                "policy/entropy": entropy.detach(),
                "policy/std_mean": log_std.exp().mean().detach(),
                "policy/approx_kl": objectives.kl_k3(zeros, log_rho),
                "policy/clip_frac": objectives.clip_fraction(ratio, cfg.clip_coef),
                "policy/ratio_max": ratio.max(),
                **penalty_stats,
            }
        return loss, stats

    # ------------------------------------------------------------------ EVALUATE
    def evaluate(self, request: "EvalRequest") -> "EvalShard":
        """Episodes of the current policy (sampled unless deterministic) on fresh envs;
        for goal envs the goals reached and a trajectory plot."""
        snapshot = self._unwrapped().snapshot(self.cfg.flow_steps, self.cfg.noise_scale, self.cfg.gaussian_head)
        return self.env.evaluate(
            snapshot,
            request,
            self.cfg.eval_deterministic,
            start_actions=lambda obs, rng: snapshot.act(obs, rng)[2],  # φ₁(z; s), before the Gaussian head
        )

    # ------------------------------------------------------------------ EXPORT
    def export(self, out_dir: Path) -> list[Path]:
        """A policy folder for ``rlprox.load_policy`` (rlprox/policy.py): the flow policy's
        weights (velocity field, σ head, critic) and the observation statistics."""
        cfg, policy = self.cfg, self._unwrapped()
        architecture = {
            "hidden_sizes": list(cfg.hidden_sizes),
            "critic_sizes": list(cfg.critic_sizes),
            "activation": cfg.activation,
            "time_features": cfg.time_features,
            "obs_embed": cfg.obs_embed,
            "log_std_bounds": list(policy.log_std_bounds),
            "flow_steps": cfg.flow_steps,
            "noise_scale": cfg.noise_scale,
            "gaussian_head": cfg.gaussian_head,
        }
        rule = (
            f"phi_1(z = 0; s): {cfg.flow_steps} midpoint (RK2) steps of the velocity field from z = 0 at t = 0 "
            "to t = 1, no Gaussian noise; clipped to [low, high]"
        )
        return self.env.export(out_dir, policy, "flow", architecture, rule, "policyflow", cfg.eval_deterministic)


register_trainer(
    TrainerSpec(
        name="policyflow",
        build=PolicyFlow,
        sections={"env": EnvConfig, "policyflow": PolicyFlowConfig},
        validate=validate,
        counts=tuple(
            f"policyflow.{key}"
            for key in (
                "num_steps",
                "minibatch_size",
                "update_epochs",
                "flow_steps",
                "fpo_samples",
                "time_features",
                "obs_embed",
            )
        ),
        minibatches_per_epoch=functools.partial(minibatches_per_epoch, section="policyflow"),
        description=(
            "PolicyFlow: PPO with a flow-matching policy, velocity-difference (or FPO) ratio, Brownian regularizer"
        ),
        eval_unit="episodes",
        eval_flags=("deterministic",),
        loss_inputs=("v", "v_hat", "x_t", "t", "base_std"),
    )
)
