"""PPO on gymnasium vector envs (Schulman et al. 2017).

Faithful to the implementation details catalogued by Huang et al. (2022, "The 37
implementation details of PPO"): GAE(γ, λ) with truncation bootstrapping,
per-minibatch advantage normalisation, clipped surrogate, clipped value loss,
entropy bonus, orthogonal init, observation and reward normalisation, linear lr
annealing (``optim.lr_schedule: linear``), global grad-norm clipping
(``optim.max_grad_norm``), optional approx-KL early stop.

The engine (rlprox/engine/) runs the fit loop and ``rlprox.onpolicy.OnPolicyEnv`` the
env side PPO shares with PolicyFlow (rollout buffers, GAE, stats, evaluation, export,
state); this file only says what to COLLECT per step, how to pack the ADVANTAGES, and
what the LOSS is.

Recurrent PPO (``ppo.lstm.hidden_size > 0``; rlprox/models/recurrent.py): an LSTM after
the observation encoder, actor and critic on its output. The rollout stores every step's
state (the state the step started from, zeroed where an episode began) and whether the
step began an episode; the update splits the ENVS into minibatches, each re-running the
LSTM over its envs' whole T-step sequences from the stored state of step 0 with the same
resets (CleanRL's ``ppo_atari_lstm.py``). The state at the end of a rollout carries into
the next one and into checkpoints.

``run.compile``: ``torch.compile`` of the torch forward the rollout runs (``heads`` of the
shared-trunk actor-critic, ``step_heads`` of the recurrent one; the vector-MLP rollout is the
numpy twin and stays as it is) and of the update's ``minibatch_loss`` (the forward and the
loss). The compiled functions take the module as an argument: it is never wrapped, so
its ``state_dict`` keys, checkpoints and exports are those of an uncompiled run.
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
    SequenceSampler,
    kl_early_stop,
    minibatches_per_epoch,
    normalized_advantages,
    validate_onpolicy,
)

if TYPE_CHECKING:
    from pathlib import Path

    from rlprox.recipe import Recipe
    from rlprox.runtime import EvalRequest, EvalShard, Runtime


@dataclass
class LSTMConfig:
    """Recurrent PPO: an LSTM between the observation encoder and the actor and critic
    heads (off while hidden_size is 0). Minibatches are then whole env sequences:
    env.num_envs must be a multiple of the minibatch count."""

    hidden_size: int = 0  # LSTM width; 0: no LSTM (feed-forward PPO)
    num_layers: int = 1  # stacked LSTM layers
    critic: Literal["shared", "separate"] = "shared"  # shared: one LSTM (CleanRL); separate: the critic's own (SB3)


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO hyperparameters (symbols of Schulman et al. 2017): the shared rollout and
    update fields of ``OnPolicyConfig``, then the Gaussian/categorical actor-critic's."""

    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # actor, critic and Dict-vector-key MLP widths
    activation: Literal["tanh", "relu"] = "tanh"  # hidden nonlinearity of the actor and critic MLPs
    encoder: str = "auto"  # auto (by the observation space), mlp, nature_cnn, or "module:Class" (docs/usage.md)
    encoder_kwargs: dict = field(default_factory=dict)  # keyword arguments of a "module:Class" encoder
    init_log_std: float = 0.0  # continuous actions: initial log σ
    eval_deterministic: bool = True  # evaluation takes the mode (argmax / mean) of π
    lstm: LSTMConfig = field(default_factory=LSTMConfig)  # recurrent PPO (off by default)

    def lstm_sizes(self) -> dict | None:
        """{hidden_size, num_layers, critic} of the LSTM, or None without one."""
        if self.lstm.hidden_size <= 0:
            return None
        return {"hidden_size": self.lstm.hidden_size, "num_layers": self.lstm.num_layers, "critic": self.lstm.critic}


def minibatch_loss(policy, inputs: tuple, old_logp, old_values, adv, returns, moments, cfg: PPOConfig):
    """PPO's loss on one minibatch (Schulman et al. 2017, eq. 9 with the PPO2 clipped value
    loss), L = −L^CLIP(θ) + c₁·L^VF(θ) − c₂·H[π_θ], and its stats. ``policy(*inputs)`` gives
    log π_θ(a|s), the entropy and V(s), each (B,); ``old_logp``, ``old_values``, ``adv`` and
    ``returns`` (B,) come from the rollout; ``moments``: the advantages' global (mean, std),
    or None to normalise with the minibatch's own."""
    logp, entropy, values = policy(*inputs)
    if cfg.norm_adv:
        adv = normalized_advantages(adv, moments)
    pg_loss, ratio = objectives.clipped_surrogate(logp, old_logp, adv, cfg.clip_coef)
    v_loss = objectives.value_loss(values, returns, old_values, cfg.clip_coef if cfg.clip_vloss else None)
    entropy = entropy.mean()
    loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": v_loss.detach(),
            "policy/entropy": entropy.detach(),
            "policy/approx_kl": objectives.kl_k3(old_logp, logp),
            "policy/clip_frac": objectives.clip_fraction(ratio, cfg.clip_coef),
            "policy/ratio_max": ratio.max(),
        }
    return loss, stats


def validate(recipe: "Recipe") -> None:
    validate_onpolicy(recipe, "ppo")
    cfg = recipe.ppo
    if not cfg.hidden_sizes or any(h <= 0 for h in cfg.hidden_sizes):
        raise RecipeError("ppo.hidden_sizes", f"must be a non-empty list of positive widths (got {cfg.hidden_sizes})")
    from rlprox.models.encoders import resolve_encoder

    resolve_encoder(cfg.encoder)
    if cfg.encoder_kwargs and ":" not in cfg.encoder:
        raise RecipeError("ppo.encoder_kwargs", f"only a 'module:Class' encoder takes kwargs (encoder: {cfg.encoder})")
    if cfg.lstm.hidden_size < 0:
        raise RecipeError("ppo.lstm.hidden_size", f"must be >= 0 (0: no LSTM) (got {cfg.lstm.hidden_size})")
    if cfg.lstm.num_layers < 1:
        raise RecipeError("ppo.lstm.num_layers", f"must be >= 1 (got {cfg.lstm.num_layers})")
    if cfg.lstm.hidden_size:
        minibatches = recipe.env.num_envs * cfg.num_steps // cfg.minibatch_size
        if recipe.env.num_envs % minibatches:
            raise RecipeError(
                "ppo.minibatch_size",
                f"with ppo.lstm a minibatch is whole env sequences: the {minibatches} minibatches "
                f"(env.num_envs × ppo.num_steps / {cfg.minibatch_size}) must divide env.num_envs = "
                f"{recipe.env.num_envs} (make ppo.minibatch_size a multiple of ppo.num_steps = {cfg.num_steps})",
            )


class PPO:
    """collect / advantages / minibatches / loss / evaluate for the engine."""

    curve = ("progress/env_steps", "reward/episodic_return")
    stat_reductions = GymRollout.REDUCTIONS

    def __init__(self, recipe: "Recipe", runtime: "Runtime"):
        from rlprox.models.encoders import build_actor_critic

        self.recipe, self.cfg, self.env_cfg = recipe, recipe.ppo, recipe.env
        self.runtime = runtime
        self.device = runtime.device
        self.rng = runtime.np_rng  # actions and minibatch permutations
        self.update_epochs = self.cfg.update_epochs
        self.early_stop = kl_early_stop(self.cfg.target_kl)
        self.lstm = self.cfg.lstm_sizes()
        env = self.env = OnPolicyEnv(self.env_cfg, recipe.seed, runtime, self.cfg.gamma)
        # the env side's hooks: rollout stats, goal summaries, per-process state, closing the envs
        self.iteration_stats, self.summarize_eval = env.iteration_stats, env.summarize_eval
        self.close = env.close
        obs_dim, space, cfg = env.obs_dim, env.space, self.cfg
        try:  # an encoder that does not fit the observation fails here, before any env step
            self.policy = build_actor_critic(
                env.layout,
                space,
                cfg.encoder,
                cfg.encoder_kwargs,
                cfg.hidden_sizes,
                cfg.activation,
                cfg.init_log_std,
                lstm=self.lstm,
            )
        except RecipeError:
            env.close()
            raise
        self.modules = {"policy": self.policy}
        self.loss_fn, self.rollout_forward = minibatch_loss, None  # run.compile: compiled copies
        if recipe.run.compile:
            self.loss_fn = torch.compile(minibatch_loss)
            self.rollout_forward = self._compiled_rollout_forward()
        self.columns = Columns(
            {
                "obs": obs_dim,
                "actions": 0 if space.discrete else space.columns,
                "logp": 0,
                "values": 0,
                "advantages": 0,
                "returns": 0,
            }
        )
        if self.lstm is None:
            self.sampler = MinibatchSampler(runtime, cfg.minibatch_size, cfg.update_epochs, cfg.norm_adv)
            return
        width = self.policy.state_width
        self.columns = Columns({**self.columns.slices_widths(), "starts": 0, "h": width, "c": width})
        self.state_names = ("starts", "h", "c")
        envs_per_minibatch = cfg.minibatch_size // cfg.num_steps
        self.sampler = SequenceSampler(runtime, cfg.num_steps, envs_per_minibatch, cfg.update_epochs, cfg.norm_adv)
        if env.rollout is not None:  # the state carried across rollouts (and checkpoints)
            self.lstm_state = self.policy.initial_state(env.rollout.num_envs, self.device)
            self.next_start = np.ones(env.rollout.num_envs, np.float32)  # the first observations begin episodes

    def _unwrapped(self):
        return self.runtime.unwrap(self.modules["policy"])

    def _compiled_rollout_forward(self):
        """The compiled forward of the torch rollout; None for the vector MLP (its numpy twin)."""
        if self.lstm is not None:
            from rlprox.models.recurrent import step_heads

            return torch.compile(step_heads)
        from rlprox.models.actor_critic import SharedActorCritic, heads

        return torch.compile(heads) if isinstance(self.policy, SharedActorCritic) else None

    def _rollout_policy(self):
        """The snapshot ``collect`` acts with: under ``run.compile`` its forward is compiled
        (evaluation keeps the eager one: its batch sizes vary)."""
        module = self._unwrapped()
        return module.snapshot() if self.rollout_forward is None else module.snapshot(self.rollout_forward)

    # ------------------------------------------------------------------ COLLECT
    def collect(self):
        if self.lstm is not None:
            return self._collect_recurrent()
        policy = self._rollout_policy()

        def act(obs):
            action, logp, value = policy.act(obs, self.rng)
            return action, {"actions": action.reshape(len(obs), -1), "logp": logp, "values": value}

        widths = {"actions": self.env.space.columns, "logp": 0, "values": 0}
        return self.env.collect(self.cfg.num_steps, act, policy.value, widths)

    def _collect_recurrent(self):
        """The rollout of an LSTM policy: the torch model step by step, carrying the
        state; each step stores the state it started from (zeroed where the step's
        observation begins an episode) and that start flag."""
        from rlprox.models.recurrent import flatten_state

        policy = self._rollout_policy()
        pending: list = []  # truncated envs of the step just taken (their final observations' values)

        def masked():
            keep = torch.from_numpy(1.0 - self.next_start).to(self.lstm_state[0].device).view(1, -1, 1)
            return self.lstm_state[0] * keep, self.lstm_state[1] * keep

        def act(obs):
            start = self.next_start
            h, c = masked()
            action, logp, value, self.lstm_state = policy.step(obs, (h, c), self.rng)
            return action, {
                "actions": action.reshape(len(obs), -1),
                "logp": logp,
                "values": value,
                "starts": start,
                "h": flatten_state(h).cpu().numpy(),
                "c": flatten_state(c).cpu().numpy(),
            }

        def on_step(done, truncated):
            self.next_start = np.asarray(done, np.float32)
            pending[:] = [truncated] if len(truncated) else []

        def value(obs):
            if pending:  # V(final observation): the state right after the episode's last step
                rows = torch.from_numpy(pending.pop()).to(self.lstm_state[0].device)
                return policy.value(obs, tuple(x.index_select(1, rows) for x in self.lstm_state))
            return policy.value(obs, masked())

        width = policy.module.state_width
        widths = {"actions": self.env.space.columns, "logp": 0, "values": 0, "starts": 0, "h": width, "c": width}
        return self.env.collect(self.cfg.num_steps, act, value, widths, on_step=on_step)

    # ------------------------------------------------------------------ ADVANTAGE
    def advantages(self, batch):
        adv, ret = self.env.gae(batch, self.cfg.gamma, self.cfg.gae_lambda)
        fields = {
            "obs": batch["obs"],
            "actions": batch["actions"],
            "logp": batch["logp"],
            "values": batch["values"],
            "advantages": adv,
            "returns": ret,
        }
        if self.lstm is not None:
            fields.update({name: batch[name] for name in self.state_names})
        return self.columns.pack(fields, self.device)

    def minibatches(self, packed: torch.Tensor, epoch: int):
        """(minibatch, advantage moments): see ``rlprox.onpolicy.MinibatchSampler``."""
        return self.sampler(packed, self.columns(packed, "advantages"), epoch)

    # ------------------------------------------------------------------ LOSS
    def loss(self, minibatch):
        mb, moments = minibatch
        col = self.columns
        inputs = (col(mb, "obs"), col(mb, "actions"))
        if self.lstm is not None:  # whole env sequences, time-major: the first n rows are step 0 of the n envs
            n = len(mb) // self.cfg.num_steps
            inputs += (col(mb, "h")[:n], col(mb, "c")[:n], col(mb, "starts"))
        rollout = (col(mb, k) for k in ("logp", "values", "advantages", "returns"))
        return self.loss_fn(self.modules["policy"], inputs, *rollout, moments, self.cfg)

    # ------------------------------------------------------------------ EVALUATE
    def evaluate(self, request: "EvalRequest") -> "EvalShard":
        """Episodic returns of the current policy on fresh envs (this process's share
        of the episodes); for goal envs also the goals reached and a trajectory plot."""
        snapshot = self._unwrapped().snapshot()
        if self.lstm is None:
            return self.env.evaluate(snapshot, request, self.cfg.eval_deterministic)
        from rlprox.models.recurrent import EpisodeActor

        actor = EpisodeActor(snapshot)  # the state carried across each episode, zeros at its start

        def fresh(obs, rng):  # goal envs' start-state draws: from the initial state
            return snapshot.step(obs, snapshot.initial_state(len(obs)), rng)[0]

        return self.env.evaluate(
            actor, request, self.cfg.eval_deterministic, start_actions=fresh, on_step=actor.end_episodes
        )

    # ------------------------------------------------------------------ STATE
    def state_dict(self) -> tuple[dict, dict]:
        """The env side's state, and with an LSTM the state carried into the next rollout."""
        tensors, state = self.env.state_dict()
        if self.lstm is not None and self.env.rollout is not None:
            h, c = self.lstm_state
            tensors = {**tensors, "lstm_h": h.detach().cpu().clone(), "lstm_c": c.detach().cpu().clone()}
            state = {**state, "lstm_start": self.next_start.tolist()}
        return tensors, state

    def load_state_dict(self, tensors: dict, state: dict) -> None:
        self.env.load_state_dict(tensors, state)
        if self.lstm is not None and self.env.rollout is not None and "lstm_h" in tensors:
            self.lstm_state = (tensors["lstm_h"].to(self.device), tensors["lstm_c"].to(self.device))
            self.next_start = np.asarray(state["lstm_start"], np.float32)

    @torch.no_grad()
    def model_stats(self) -> dict:
        """Neuron sparsity of the actor's hidden layers: a neuron whose incoming weight
        row is exactly zero outputs a constant and can be folded into the next layer.
        Reported for recipes with regularizers."""
        if not self.recipe.regularizers:
            return {}
        hidden = self._unwrapped().hidden_linears()
        zero = [int(m.weight.abs().sum(1).eq(0).sum()) for m in hidden]
        total = [m.out_features for m in hidden]
        from rlprox.prox.attach import describe_pruning

        stats = {"pruning": describe_pruning(self.recipe.regularizers)}
        stats.update({f"sparsity/actor_layer{i}_zero_neurons": z for i, z in enumerate(zero)})
        if total:
            stats["sparsity/actor_hidden_neurons_zero_fraction"] = sum(zero) / sum(total)
        return stats

    # ------------------------------------------------------------------ EXPORT
    def export(self, out_dir: Path) -> list[Path]:
        """A policy folder for ``rlprox.load_policy`` (rlprox/policy.py): the actor-critic's
        weights and the observation statistics; greedy actions as ``evaluate`` takes them."""
        from rlprox.models.encoders import architecture as trunk_architecture

        cfg, space = self.cfg, self.env.space
        rule = {
            "discrete": "argmax of the actor's logits",
            "multidiscrete": "argmax of each component's logits",
            "multibinary": "1 where the actor's logit is positive",
        }.get(space.kind, "the Gaussian mean (the actor's output), clipped to [low, high]")
        architecture = {"hidden_sizes": list(cfg.hidden_sizes), "activation": cfg.activation}
        architecture.update(trunk_architecture(self.env.layout, cfg.encoder, cfg.encoder_kwargs, self.lstm))
        if self.lstm is not None:
            rule += (
                "; recurrent: the LSTM state (h, c) is carried across an episode's steps from zeros "
                "(load_policy: act(obs, state=...) -> (action, state))"
            )
        return self.env.export(
            out_dir, self._unwrapped(), "actor_critic", architecture, rule, "ppo", cfg.eval_deterministic
        )


register_trainer(
    TrainerSpec(
        name="ppo",
        build=lambda recipe, runtime, loss_terms: PPO(recipe, runtime),
        sections={"env": EnvConfig, "ppo": PPOConfig},
        validate=validate,
        counts=("ppo.num_steps", "ppo.minibatch_size", "ppo.update_epochs"),
        minibatches_per_epoch=functools.partial(minibatches_per_epoch, section="ppo"),
        description="PPO on any gymnasium env (vector, image or Dict observations; discrete, multi-discrete, "
        "multi-binary or continuous actions)",
        eval_unit="episodes",
        eval_flags=("deterministic",),
        compiles=True,
    )
)
