"""MLP actor-critic for vector observations, discrete or continuous actions.

Separate actor and critic MLPs with orthogonal initialisation (hidden gain √2, policy
head 0.01, value head 1; the PPO implementation details of Huang et al. 2022).
Continuous actions: diagonal Gaussian with a state-independent learned log-std.

The rollout does not call torch per env step: ``snapshot()`` copies the weights into
numpy once per iteration and ``NumpyPolicy.act`` runs the small forward pass and the
sampling there, which removes most of the per-step overhead on CPU
(docs/notes/ppo-cpu-throughput.md). The update uses the torch modules and autograd.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

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
    ):
        super().__init__()
        self.obs_dim, self.action_dim, self.discrete = obs_dim, action_dim, discrete
        self.activation = activation
        self.actor = mlp([obs_dim, *hidden_sizes, action_dim], activation, 0.01)
        self.critic = mlp([obs_dim, *hidden_sizes, 1], activation, 1.0)
        if not discrete:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        """log π(a|s), entropy and V(s) for the update; obs (B, obs_dim)."""
        out = self.actor(obs)
        if self.discrete:
            logits = torch.log_softmax(out, -1)  # log-probs, (B, A)
            logp = logits.gather(-1, actions.long().view(-1, 1)).squeeze(-1)
            entropy = -(logits.exp() * logits).sum(-1)
        else:
            log_std = self.log_std.expand_as(out)
            z = (actions - out) * torch.exp(-log_std)
            logp = (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)
            entropy = (log_std + 0.5 * (1.0 + LOG_2PI)).sum(-1)
        return logp, entropy, self.value(obs)

    def snapshot(self) -> "NumpyPolicy":
        log_std = to_numpy(self.log_std) if not self.discrete else None
        return NumpyPolicy(
            numpy_layers(self.actor),
            numpy_layers(self.critic),
            ACTIVATIONS[self.activation][1],
            self.discrete,
            log_std,
        )


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

    def __init__(self, actor, critic, act_fn, discrete: bool, log_std):
        self.actor, self.critic, self.act_fn = actor, critic, act_fn
        self.discrete, self.log_std = discrete, log_std
        self.action_dim = actor[-1][0].shape[1]
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
        if self.discrete:
            shifted = out - out.max(-1, keepdims=True)
            unnorm = np.exp(shifted)
            cdf = np.cumsum(unnorm, -1)  # cdf[:, -1] = Σ exp
            if deterministic:
                action = shifted.argmax(-1)
            else:  # inverse-CDF sampling of the categorical
                u = rng.random(len(obs)) * cdf[:, -1]
                action = (cdf < u[:, None]).sum(-1)
                np.minimum(action, out.shape[-1] - 1, out=action)  # u at the float edge
            rows = self._rows if len(obs) == len(self._rows) else np.arange(len(obs))
            logp = shifted[rows, action] - np.log(cdf[:, -1])
        else:
            std = np.exp(self.log_std)
            action = out if deterministic else out + std * rng.standard_normal(out.shape).astype(np.float32)
            z = (action - out) / std
            logp = (-0.5 * z**2 - self.log_std - 0.5 * LOG_2PI).sum(-1)
        return action, logp.astype(np.float32), value
