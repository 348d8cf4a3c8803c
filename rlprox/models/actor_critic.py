"""Actor-critics for PPO: ``ActorCritic`` (separate actor and critic MLPs, vector
observations) and ``SharedActorCritic`` (actor and critic heads on one observation
trunk: images, Dict observations, user encoders; rlprox/models/encoders.py), with the
action distributions of ``rlprox.spaces.ActionSpace``:

- Discrete: a categorical over the logits;
- MultiDiscrete: one categorical per component, log-probs and entropies summed;
- MultiBinary: independent Bernoullis with logits x, log p(a) = Σ a·log σ(x) + (1−a)·log σ(−x);
- Box (any shape, flattened): a diagonal Gaussian with a state-independent learned
  log-std; the env gets the sample clipped to the Box and reshaped.

``ActorCritic``: separate actor and critic MLPs with orthogonal initialisation (hidden gain √2, policy
head 0.01, value head 1; the PPO implementation details of Huang et al. 2022).
Continuous actions: diagonal Gaussian with a state-independent learned log-std.

The rollout does not call torch per env step: ``snapshot()`` copies the weights into
numpy once per iteration and ``NumpyPolicy.act`` runs the small forward pass and the
sampling there, which removes most of the per-step overhead on CPU
(docs/notes/ppo-cpu-throughput.md). ``SharedActorCritic.snapshot()`` runs the torch
module itself under no_grad (convolutions gain nothing from a numpy copy) and samples
with the same numpy code. The update uses the torch modules and autograd.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rlprox.spaces import ActionSpace

ACTIVATIONS = {"tanh": (nn.Tanh, np.tanh), "relu": (nn.ReLU, lambda x: np.maximum(x, 0.0))}
LOG_2PI = math.log(2.0 * math.pi)


def mlp(sizes: list[int], activation: str, out_gain: float) -> nn.Sequential:
    act = ACTIVATIONS[activation][0]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2.0))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(act())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        discrete: bool,
        hidden_sizes=(64, 64),
        activation: str = "tanh",
        init_log_std: float = 0.0,
        space: ActionSpace | None = None,
    ):
        super().__init__()
        self.space = space if space is not None else ActionSpace.simple(discrete, action_dim)
        self.obs_dim, self.action_dim, self.discrete = obs_dim, self.space.dim, self.space.discrete
        self.activation = activation
        self.actor = mlp([obs_dim, *hidden_sizes, self.action_dim], activation, 0.01)
        self.critic = mlp([obs_dim, *hidden_sizes, 1], activation, 1.0)
        if self.space.kind == "box":
            self.log_std = nn.Parameter(torch.full((self.action_dim,), float(init_log_std)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        """log π(a|s), entropy and V(s) for the update; obs (B, obs_dim)."""
        logp, entropy = log_prob_entropy(self.space, self.actor(obs), actions, getattr(self, "log_std", None))
        return logp, entropy, self.value(obs)

    def hidden_linears(self) -> list[nn.Linear]:
        """The actor's hidden layers (``PPO.model_stats`` counts their zero neurons)."""
        return [m for m in self.actor if isinstance(m, nn.Linear)][:-1]

    def snapshot(self) -> "NumpyPolicy":
        log_std = to_numpy(self.log_std) if self.space.kind == "box" else None
        return NumpyPolicy(
            numpy_layers(self.actor),
            numpy_layers(self.critic),
            ACTIVATIONS[self.activation][1],
            self.discrete,
            log_std,
            self.space,
        )


def log_prob_entropy(space: ActionSpace, out: torch.Tensor, actions: torch.Tensor, log_std: torch.Tensor | None):
    """log π(a|s) and the entropy of π(·|s), each (B,), from the actor's output ``out``
    (B, space.dim) and flat actions ((B,) for Discrete, else (B, space.columns))."""
    if space.kind == "discrete":
        logits = torch.log_softmax(out, -1)  # log-probs, (B, A)
        logp = logits.gather(-1, actions.long().view(-1, 1)).squeeze(-1)
        entropy = -(logits.exp() * logits).sum(-1)
    elif space.kind == "box":
        log_std = log_std.expand_as(out)
        z = (actions - out) * torch.exp(-log_std)
        logp = (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)
    elif space.kind == "multidiscrete":
        logp, entropy = out.new_zeros(len(out)), out.new_zeros(len(out))
        for j, logits in enumerate(torch.split(out, list(space.nvec), dim=-1)):
            logits = torch.log_softmax(logits, -1)
            logp = logp + logits.gather(-1, actions[:, j].long().view(-1, 1)).squeeze(-1)
            entropy = entropy - (logits.exp() * logits).sum(-1)
    else:  # multibinary: Bernoulli(σ(x)) per bit
        log_p1, log_p0 = nn.functional.logsigmoid(out), nn.functional.logsigmoid(-out)
        logp = (actions * log_p1 + (1.0 - actions) * log_p0).sum(-1)
        entropy = -(log_p1.exp() * log_p1 + log_p0.exp() * log_p0).sum(-1)
    return logp, entropy


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy. Never a view: a parameter's storage shared with numpy can
    no longer be resized, which FSDP does to free gathered parameters."""
    return t.detach().to("cpu", torch.float32, copy=True).numpy()


def numpy_layers(seq: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W as (in, out), b) of every Linear of ``seq``, copied to numpy."""
    return [(np.ascontiguousarray(to_numpy(m.weight).T), to_numpy(m.bias)) for m in seq if isinstance(m, nn.Linear)]


def numpy_mlp(layers: list, x: np.ndarray, act_fn) -> np.ndarray:
    """The MLP of ``numpy_layers`` on x: activation between layers, none after the last."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = act_fn(x)
    return x


def fuse(actor: list, critic: list) -> list:
    """Actor and critic MLPs of equal depth as ONE MLP whose hidden layers are the two
    side by side (first layer concatenated, later layers block-diagonal): half the
    matmuls per rollout step, same outputs ([:, :A] actor, [:, A:] critic)."""
    fused = []
    for i, ((wa, ba), (wc, bc)) in enumerate(zip(actor, critic)):
        if i == 0:
            w = np.concatenate([wa, wc], axis=1)
        else:
            w = np.zeros((wa.shape[0] + wc.shape[0], wa.shape[1] + wc.shape[1]), wa.dtype)
            w[: wa.shape[0], : wa.shape[1]] = wa
            w[wa.shape[0] :, wa.shape[1] :] = wc
        fused.append((w, np.concatenate([ba, bc])))
    return fused


class NumpyPolicy:
    """Frozen numpy copy of an ActorCritic for the rollout (same distribution)."""

    def __init__(self, actor, critic, act_fn, discrete: bool, log_std, space: ActionSpace | None = None):
        self.actor, self.critic, self.act_fn = actor, critic, act_fn
        self.discrete, self.log_std = discrete, log_std
        self.action_dim = actor[-1][0].shape[1]
        self.space = space if space is not None else ActionSpace.simple(discrete, self.action_dim)
        self._rows = np.arange(0)
        self.fused = fuse(actor, critic) if len(actor) == len(critic) else None

    def _mlp(self, layers, x):
        return numpy_mlp(layers, x, self.act_fn)

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self._mlp(self.critic, obs)[:, 0]

    def act(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False):
        """(action, log π(a|s), V(s)) for a batch of observations."""
        if len(self._rows) != len(obs):
            self._rows = np.arange(len(obs))
        if self.fused is not None:
            both = self._mlp(self.fused, obs)
            out, value = both[:, : self.action_dim], both[:, self.action_dim]
        else:
            out, value = self._mlp(self.actor, obs), self.value(obs)
        action, logp = sample_actions(self.space, out, rng, deterministic, self.log_std, self._rows)
        return action, logp, value


def sample_categorical(out: np.ndarray, rng: np.random.Generator, deterministic: bool, rows: np.ndarray):
    """(action, log-prob) of categoricals with logits ``out`` (N, A): inverse-CDF
    sampling with one uniform per row, or the argmax."""
    shifted = out - out.max(-1, keepdims=True)
    unnorm = np.exp(shifted)
    cdf = np.cumsum(unnorm, -1)  # cdf[:, -1] = Σ exp
    if deterministic:
        action = shifted.argmax(-1)
    else:
        u = rng.random(len(out)) * cdf[:, -1]
        action = (cdf < u[:, None]).sum(-1)
        np.minimum(action, out.shape[-1] - 1, out=action)  # u at the float edge
    rows = rows if len(out) == len(rows) else np.arange(len(out))
    return action, shifted[rows, action] - np.log(cdf[:, -1])


def sample_actions(
    space: ActionSpace,
    out: np.ndarray,
    rng: np.random.Generator,
    deterministic: bool,
    log_std: np.ndarray | None,
    rows: np.ndarray | None = None,
):
    """(flat action, log π(a|s) float32) from the actor's output ``out`` (N, space.dim):
    a sample of the distribution of ``log_prob_entropy``, or its mode (argmax per
    categorical, bits with positive logits, the Gaussian mean) when ``deterministic``."""
    rows = np.arange(len(out)) if rows is None else rows
    if space.kind == "discrete":
        action, logp = sample_categorical(out, rng, deterministic, rows)
    elif space.kind == "box":
        std = np.exp(log_std)
        action = out if deterministic else out + std * rng.standard_normal(out.shape).astype(np.float32)
        z = (action - out) / std
        logp = (-0.5 * z**2 - log_std - 0.5 * LOG_2PI).sum(-1)
    elif space.kind == "multidiscrete":
        parts = [
            sample_categorical(logits, rng, deterministic, rows)
            for logits in np.split(out, np.cumsum(space.nvec)[:-1], axis=-1)
        ]
        action = np.stack([a for a, _ in parts], -1)
        logp = sum(lp for _, lp in parts)
    else:  # multibinary
        if deterministic:
            action = (out > 0).astype(np.float32)
        else:
            action = (rng.random(out.shape) < 1.0 / (1.0 + np.exp(-out))).astype(np.float32)
        log_p1, log_p0 = -np.logaddexp(0.0, -out), -np.logaddexp(0.0, out)  # log σ(x), log σ(−x)
        logp = (action * log_p1 + (1.0 - action) * log_p0).sum(-1)
    return action, logp.astype(np.float32)


def heads(module: "SharedActorCritic", obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's output (B, space.dim) and V(s) (B,) of a shared-trunk actor-critic on
    flat observations (B, obs_dim): the rollout's forward (``torch.compile``d under
    ``run.compile``)."""
    features = module.trunk(obs)
    return module.actor(features), module.critic(features)[:, 0]


class TorchPolicy:
    """The rollout's view of a ``SharedActorCritic``: the torch module itself, run under
    no_grad on numpy observations, with the numpy sampling of ``sample_actions`` (the
    same RNG stream as ``NumpyPolicy``). ``forward`` replaces ``heads`` in ``act`` (a
    compiled copy of it: a fixed batch size, the rollout's). Valid while the module's
    weights do not change (one collect, one evaluation)."""

    def __init__(self, module: "SharedActorCritic", forward=None):
        self.module, self.space = module, module.space
        self.forward = forward if forward is not None else heads
        self.device = next(module.parameters()).device
        self.log_std = to_numpy(module.log_std) if self.space.kind == "box" else None

    def _tensor(self, obs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(obs, np.float32)).to(self.device)

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.module.critic(self.module.trunk(self._tensor(obs)))[:, 0].float().cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False):
        """(action, log π(a|s), V(s)) for a batch of observations."""
        out, value = self.forward(self.module, self._tensor(obs))
        action, logp = sample_actions(self.space, out.float().cpu().numpy(), rng, deterministic, self.log_std)
        return action, logp, value.float().cpu().numpy()


class SharedActorCritic(nn.Module):
    """Actor and critic heads on one observation trunk (the layout of CleanRL's Atari
    PPO): features = trunk(obs) (B, F); actor logits / Gaussian mean = Linear(F, A)
    with orthogonal init gain 0.01, V(s) = Linear(F, 1) with gain 1."""

    def __init__(self, trunk: nn.Module, space: ActionSpace, init_log_std: float = 0.0):
        super().__init__()
        self.space, self.discrete, self.action_dim = space, space.discrete, space.dim
        self.trunk = trunk
        self.actor = orthogonal(nn.Linear(trunk.out_features, space.dim), 0.01)
        self.critic = orthogonal(nn.Linear(trunk.out_features, 1), 1.0)
        if space.kind == "box":
            self.log_std = nn.Parameter(torch.full((space.dim,), float(init_log_std)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.trunk(obs)).squeeze(-1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        """log π(a|s), entropy and V(s) for the update; obs (B, obs_dim), flat."""
        features = self.trunk(obs)
        logp, entropy = log_prob_entropy(self.space, self.actor(features), actions, getattr(self, "log_std", None))
        return logp, entropy, self.critic(features).squeeze(-1)

    def hidden_linears(self) -> list[nn.Linear]:
        """The trunk's linear layers (``PPO.model_stats`` counts their zero neurons)."""
        return [m for m in self.trunk.modules() if isinstance(m, nn.Linear)]

    def snapshot(self, forward=None) -> TorchPolicy:
        return TorchPolicy(self, forward)


def orthogonal(layer: nn.Module, gain: float) -> nn.Module:
    """Orthogonal weights with ``gain``, zero bias (Huang et al. 2022, detail 2)."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer
