"""A flow-matching (continuous normalizing flow) policy with a Gaussian output head,
and its critic (PolicyFlow, arXiv 2602.01156).

    a = φ₁(z; s) + n,   z ~ N(0, I),   n ~ N(0, diag σ²)

φ is the flow of a learned velocity v_θ(x, t, s) from t = 0 (noise z) to t = 1 (the
action), integrated with K midpoint (RK2) steps:

    x_{k+½} = x_k + (h/2)·v_θ(x_k, t_k, s),   x_{k+1} = x_k + h·v_θ(x_{k+½}, t_k + h/2, s),   h = 1/K

v_θ is an MLP on [x, Fourier features of t, an embedding of s]; its last layer is
scaled small at init so the initial flow is nearly the identity (φ₁(z) ≈ z). σ is a
learned per-dimension std, bounded: log σ = lo + (hi − lo)·sigmoid(ρ).

As for PPO, the rollout does not call torch per env step: ``snapshot()`` copies the
weights into numpy once per iteration (the 2K velocity evaluations of one env step
then cost a few small matmuls each), with the time-feature part of the first layer
precomputed for the K midpoint grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rlprox.models.actor_critic import ACTIVATIONS, LOG_2PI, mlp, numpy_layers, numpy_mlp, to_numpy


def fourier_features(t: torch.Tensor, num: int) -> torch.Tensor:
    """[sin(2π·2^k·t), cos(2π·2^k·t)] for k < num: (B,) -> (B, 2·num)."""
    freqs = (2.0 ** torch.arange(num, device=t.device, dtype=torch.float32)) * 2 * math.pi
    angles = t.reshape(-1, 1).float() * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class FlowPolicy(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes=(64, 64),
        activation: str = "tanh",
        time_features: int = 4,
        obs_embed: int = 32,
        critic_sizes=(64, 64),
        init_log_std: float = -1.0,
        log_std_bounds=(-5.0, 0.5),
        last_layer_scale: float = 0.01,
    ):
        super().__init__()
        self.obs_dim, self.action_dim, self.activation = obs_dim, action_dim, activation
        self.time_features = time_features
        self.embed = mlp(
            [obs_dim, obs_embed], activation, math.sqrt(2.0)
        )  # one Linear; its activation is applied in forward
        self.velocity = mlp(
            [action_dim + 2 * time_features + obs_embed, *hidden_sizes, action_dim], activation, last_layer_scale
        )
        self.critic = mlp([obs_dim, *critic_sizes, 1], activation, 1.0)
        lo, hi = float(log_std_bounds[0]), float(log_std_bounds[1])
        if not lo < init_log_std < hi:
            raise ValueError(f"init_log_std {init_log_std} must lie inside log_std_bounds ({lo}, {hi})")
        self.log_std_bounds = (lo, hi)
        frac = (init_log_std - lo) / (hi - lo)
        self.log_std_param = nn.Parameter(torch.full((action_dim,), math.log(frac / (1 - frac))))

    # ------------------------------------------------------------------ torch side
    def log_std(self) -> torch.Tensor:
        lo, hi = self.log_std_bounds
        return lo + (hi - lo) * torch.sigmoid(self.log_std_param)

    def obs_embedding(self, obs: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation][0]()(self.embed(obs))

    def velocity_field(
        self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor | None = None, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v_θ(x, t, s): x (B, A), t (B,) or scalar, obs (B, obs_dim) -> (B, A)."""
        e = self.obs_embedding(obs) if embedding is None else embedding
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return self.velocity(torch.cat([x, fourier_features(t, self.time_features), e], -1))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor):
        """(v_θ(x, t, s), V(s), log σ): everything the update needs in one call (so a
        DDP wrapper sees every parameter used)."""
        return self.velocity_field(x, t, obs), self.value(obs), self.log_std()

    @torch.no_grad()
    def flow(self, obs: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
        """φ₁(z; s) by ``steps`` midpoint steps (the same integrator as the rollout)."""
        e, x, h = self.obs_embedding(obs), z, 1.0 / steps
        for k in range(steps):
            t = k * h
            mid = x + 0.5 * h * self.velocity_field(x, t, embedding=e)
            x = x + h * self.velocity_field(mid, t + 0.5 * h, embedding=e)
        return x

    # ------------------------------------------------------------------ numpy rollout
    def snapshot(self, steps: int, noise_scale: float = 1.0, head: bool = True) -> "NumpyFlow":
        vel = numpy_layers(self.velocity)
        w1, b1 = vel[0]
        A, F = self.action_dim, 2 * self.time_features
        w_x, w_t, w_e = w1[:A], w1[A : A + F], w1[A + F :]
        grid = np.array([[k / steps, (k + 0.5) / steps] for k in range(steps)], np.float32).reshape(-1)
        t_part = (
            fourier_features(torch.from_numpy(grid), self.time_features).numpy() @ w_t
        )  # (2K, H): the time part of layer 1
        return NumpyFlow(
            numpy_layers(self.embed)[0],
            w_x,
            w_e,
            b1,
            t_part.reshape(steps, 2, -1),
            vel[1:],
            numpy_layers(self.critic),
            ACTIVATIONS[self.activation][1],
            to_numpy(self.log_std()),
            steps,
            noise_scale,
            head,
        )


class NumpyFlow:
    """Frozen numpy copy of a FlowPolicy for the rollout (same computations)."""

    def __init__(self, embed, w_x, w_e, b1, t_part, rest, critic, act_fn, log_std, steps, noise_scale=1.0, head=True):
        self.embed, self.w_x, self.w_e, self.b1, self.t_part = embed, w_x, w_e, b1, t_part
        self.rest, self.critic, self.act_fn, self.log_std, self.steps = rest, critic, act_fn, log_std, steps
        self.noise_scale = np.float32(noise_scale)  # z ~ N(0, noise_scale² I)
        self.head = head  # the Gaussian head n ~ N(0, σ²); False: a = φ₁(z), δ = 0, log-prob 0

    def value(self, obs: np.ndarray) -> np.ndarray:
        return numpy_mlp(self.critic, obs, self.act_fn)[:, 0]

    def _velocity(self, x: np.ndarray, base: np.ndarray, k: int, half: int) -> np.ndarray:
        h = self.act_fn(x @ self.w_x + base + self.t_part[k, half])
        return numpy_mlp(self.rest, h, self.act_fn)

    def flow(self, obs: np.ndarray, z: np.ndarray) -> np.ndarray:
        w, b = self.embed
        base = self.act_fn(obs @ w + b) @ self.w_e + self.b1  # the observation part of layer 1, once per env step
        x, h = z, 1.0 / self.steps
        for k in range(self.steps):
            mid = x + 0.5 * h * self._velocity(x, base, k, 0)
            x = x + h * self._velocity(mid, base, k, 1)
        return x

    def act(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False):
        """(action, z, φ̂₁, δ, log N(δ; 0, σ̂²), V(s)) for a batch of observations; the
        action is φ̂₁ + δ before any env clipping. Deterministic: z = 0, δ = 0; no head: δ = 0."""
        n, a = len(obs), self.log_std.shape[0]
        z = (
            np.zeros((n, a), np.float32)
            if deterministic
            else self.noise_scale * rng.standard_normal((n, a)).astype(np.float32)
        )
        phi = self.flow(obs, z).astype(np.float32)
        std = np.exp(self.log_std)
        if deterministic or not self.head:
            delta = np.zeros_like(phi)
        else:
            delta = (std * rng.standard_normal((n, a))).astype(np.float32)
        logp = (-0.5 * (delta / std) ** 2 - self.log_std - 0.5 * LOG_2PI).sum(-1).astype(np.float32)
        return phi + delta, z, phi, delta, logp, self.value(obs)
