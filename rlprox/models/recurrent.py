"""Recurrent PPO's model (``ppo.lstm``): the observation encoder of
``rlprox.models.encoders`` (an MLP of ``hidden_sizes`` for a vector Box, the Nature CNN
for images, one encoder per Dict key, or a user's ``module:Class``), then an LSTM, then
the actor and critic heads: features → LSTM(hidden_size, num_layers) → actor Linear (gain
0.01) and critic Linear (gain 1); LSTM weights orthogonal (gain 1), biases zero. With
``critic="shared"`` both heads read the SAME LSTM output (CleanRL's ``ppo_atari_lstm.py``);
with ``"separate"`` the critic has its own LSTM on the same features (sb3-contrib
``RecurrentPPO``'s default), so the value loss never shapes the actor's memory.

State: (h, c), each (num_layers, batch, state_size); state_size is hidden_size, or
2 × hidden_size with a separate critic (the actor's state, then the critic's). At every
step the state is first multiplied by (1 − start), start = 1 where the step's observation begins an episode (the
previous step ended one), so no memory crosses an episode boundary; the rollout stores
this masked state of every step (the state *before* the step), and the update re-runs
each minibatch's env sequences from the stored state of their first step with the same
masks (``unroll``).

The rollout runs the torch module step by step under no_grad (``RecurrentTorchPolicy``:
no numpy twin) and samples with the numpy code of ``sample_actions``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlprox.models.actor_critic import log_prob_entropy, orthogonal, sample_actions, to_numpy
from rlprox.spaces import ActionSpace


class RecurrentActorCritic(nn.Module):
    def __init__(
        self,
        trunk: nn.Module,
        space: ActionSpace,
        hidden_size: int,
        num_layers: int = 1,
        init_log_std=0.0,
        critic: str = "shared",
    ):
        super().__init__()
        if critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate' (got {critic!r})")
        self.space, self.discrete, self.action_dim = space, space.discrete, space.dim
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.state_size = self.hidden_size * (2 if critic == "separate" else 1)
        self.trunk = trunk
        self.lstm = self._new_lstm()
        self.critic_lstm = self._new_lstm() if critic == "separate" else None
        self.actor = orthogonal(nn.Linear(self.hidden_size, space.dim), 0.01)
        self.critic = orthogonal(nn.Linear(self.hidden_size, 1), 1.0)
        if space.kind == "box":
            self.log_std = nn.Parameter(torch.full((space.dim,), float(init_log_std)))

    def _new_lstm(self) -> nn.LSTM:
        lstm = nn.LSTM(self.trunk.out_features, self.hidden_size, self.num_layers)
        for name, param in lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(param, 0.0)
            elif "weight" in name:
                nn.init.orthogonal_(param, 1.0)
        return lstm

    @property
    def state_width(self) -> int:
        """Columns of one env's h (or c) flattened: num_layers × state_size."""
        return self.num_layers * self.state_size

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, batch, self.state_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def step(self, obs: torch.Tensor, state, start: torch.Tensor | None = None):
        """One step for a batch (B, obs_dim): (LSTM output (B, H), new state); the state
        is zeroed first where ``start`` (B,) is 1."""
        h, c = state
        if start is not None:
            keep = (1.0 - start).view(1, -1, 1)
            h, c = h * keep, c * keep
        out, new = self.recur(self.trunk(obs).unsqueeze(0), (h, c))
        return out[0], new

    def recur(self, x: torch.Tensor, state):
        """The LSTM(s) on features x (T, B, F) from ``state``: (outputs (T, B, state_size),
        new state), the critic's half after the actor's with a separate critic."""
        if self.critic_lstm is None:
            return self.lstm(x, state)
        H = self.hidden_size
        (h, c), outs, hs, cs = state, [], [], []
        for lstm, part in ((self.lstm, slice(0, H)), (self.critic_lstm, slice(H, 2 * H))):
            out, (h1, c1) = lstm(x, (h[..., part].contiguous(), c[..., part].contiguous()))
            outs.append(out)
            hs.append(h1)
            cs.append(c1)
        return torch.cat(outs, -1), (torch.cat(hs, -1), torch.cat(cs, -1))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(actor output (B, space.dim), V(s) (B,)) of LSTM outputs (B, state_size)."""
        return self.actor(features[..., : self.hidden_size]), self.critic(features[..., -self.hidden_size :])[..., 0]

    def unroll(self, obs: torch.Tensor, state, starts: torch.Tensor, keep_states: bool = False):
        """T steps of n envs: ``obs`` (T·n, obs_dim) time-major (row t·n + i is env i at
        step t), ``starts`` (T·n,), ``state`` (h, c) of step 0. Returns the LSTM outputs
        (T·n, H), the final state and, with ``keep_states``, the masked state each step
        started from ((T, L, n, H) for h and for c), else None. Without ``keep_states``
        the LSTM runs once per span of steps where no env begins an episode (the same
        recurrence as one step at a time, with fewer calls)."""
        n = state[0].shape[1]
        x = self.trunk(obs).reshape(-1, n, self.trunk.out_features)
        return self._recur(x, state, starts.reshape(-1, n), keep_states)

    @torch.compiler.disable  # run.compile: span cuts that depend on the data, and nn.LSTM, stay eager
    def _recur(self, x: torch.Tensor, state, starts: torch.Tensor, keep_states: bool):
        """``unroll`` after the trunk: x (T, n, F), starts (T, n)."""
        h, c = state
        T = len(x)
        if keep_states:
            cuts = list(range(T + 1))
        else:
            begins = torch.nonzero(starts[1:].detach().cpu().any(1)).flatten() + 1
            cuts = [0, *begins.tolist(), T]
        outs, hs, cs = [], [], []
        for a, b in zip(cuts[:-1], cuts[1:]):
            keep = (1.0 - starts[a]).view(1, -1, 1)
            h, c = h * keep, c * keep
            if keep_states:
                hs.append(h)
                cs.append(c)
            out, (h, c) = self.recur(x[a:b], (h, c))
            outs.append(out.reshape(-1, out.shape[-1]))
        kept = (torch.stack(hs), torch.stack(cs)) if keep_states else None
        return torch.cat(outs), (h, c), kept

    def forward(self, obs, actions, h0, c0, starts):
        """log π(a|s), entropy and V(s) of a minibatch of whole env sequences: ``obs``
        (T·n, obs_dim) and ``actions`` time-major, ``h0``/``c0`` (n, num_layers·H) the
        stored states of step 0, ``starts`` (T·n,)."""
        features, _, _ = self.unroll(obs, (unflatten_state(h0, self), unflatten_state(c0, self)), starts)
        out, value = self.heads(features)
        logp, entropy = log_prob_entropy(self.space, out, actions, getattr(self, "log_std", None))
        return logp, entropy, value

    def hidden_linears(self) -> list[nn.Linear]:
        """The trunk's linear layers (``PPO.model_stats`` counts their zero neurons)."""
        return [m for m in self.trunk.modules() if isinstance(m, nn.Linear)]

    def snapshot(self, forward=None) -> "RecurrentTorchPolicy":
        return RecurrentTorchPolicy(self, forward)


def step_heads(module: RecurrentActorCritic, obs: torch.Tensor, h: torch.Tensor, c: torch.Tensor, start=None):
    """One step from the state (h, c) (zeroed where ``start`` is 1) on flat observations
    (B, obs_dim): the actor's output (B, space.dim), V(s) (B,) and the new state; the
    rollout's forward (``torch.compile``d under ``run.compile``)."""
    features, new = module.step(obs, (h, c), start)
    return *module.heads(features), new


def flatten_state(x: torch.Tensor) -> torch.Tensor:
    """(L, n, S) → (n, L·S): one row per env, as the rollout stores it."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def unflatten_state(rows: torch.Tensor, module: RecurrentActorCritic) -> torch.Tensor:
    """(n, L·S) → (L, n, S), contiguous (what nn.LSTM takes); S = ``module.state_size``."""
    return rows.reshape(len(rows), module.num_layers, module.state_size).transpose(0, 1).contiguous()


class RecurrentTorchPolicy:
    """The rollout's and evaluation's view of a ``RecurrentActorCritic``: the torch module
    under no_grad on numpy observations, the state passed explicitly as torch tensors,
    numpy sampling (``sample_actions``). ``forward`` replaces ``step_heads`` in ``step`` (a
    compiled copy of it). Valid while the weights do not change."""

    recurrent = True

    def __init__(self, module: RecurrentActorCritic, forward=None):
        self.module, self.space = module, module.space
        self.forward = forward if forward is not None else step_heads
        self.device = next(module.parameters()).device
        self.log_std = to_numpy(module.log_std) if self.space.kind == "box" else None

    def initial_state(self, batch: int):
        return self.module.initial_state(batch, self.device)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)

    @torch.no_grad()
    def step(self, obs: np.ndarray, state, rng: np.random.Generator, deterministic: bool = False, start=None):
        """(action, log π(a|s), V(s), new state) for a batch of observations; the state
        is zeroed first where ``start`` (numpy (B,)) is 1."""
        start = None if start is None else self._tensor(start)
        out, value, new = self.forward(self.module, self._tensor(obs), *state, start)
        action, logp = sample_actions(self.space, out.float().cpu().numpy(), rng, deterministic, self.log_std)
        return action, logp, value.float().cpu().numpy(), new

    @torch.no_grad()
    def value(self, obs: np.ndarray, state) -> np.ndarray:
        """V(s) of a batch of observations from ``state`` (not masked)."""
        features, _ = self.module.step(self._tensor(obs), state)
        return self.module.heads(features)[1].float().cpu().numpy()


class EpisodeActor:
    """A recurrent snapshot as a stateful ``act(obs, rng, deterministic)`` for evaluation:
    one state per env row, zeroed by ``end_episodes(mask)`` where an episode ended, and
    fresh (zeros) whenever the batch size changes."""

    def __init__(self, snapshot: RecurrentTorchPolicy):
        self.snapshot, self.state = snapshot, None

    def act(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False):
        if self.state is None or self.state[0].shape[1] != len(obs):
            self.state = self.snapshot.initial_state(len(obs))
        action, logp, value, self.state = self.snapshot.step(obs, self.state, rng, deterministic)
        return action, logp, value

    def end_episodes(self, ended: np.ndarray) -> None:
        if self.state is not None and np.any(ended):
            keep = torch.from_numpy(1.0 - np.asarray(ended, np.float32)).to(self.state[0].device).view(1, -1, 1)
            self.state = (self.state[0] * keep, self.state[1] * keep)
