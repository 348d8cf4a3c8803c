"""Trained env policies outside the trainers: the folder ``rlprox export`` writes for
PPO and PolicyFlow, and ``load_policy`` to act with it.

A policy folder holds

- ``config.json``: ``"format": "rlprox-policy"``, the policy kind (``actor_critic`` or
  ``flow``), its architecture, the observation width and normaliser clip, the action
  space (Discrete n, or a Box with its low/high bounds; ``null`` is unbounded), the
  rule that maps the network to the deterministic action, and the env id the policy
  was trained on (for reference: loading never builds the env). Observations other
  than a 1-D vector Box add their ``layout`` (``rlprox.spaces``: one entry per Box or
  Dict key, with its shape and whether it is an image); models with an encoder
  (images, Dict, a user's ``module:Class``) record it in ``architecture`` with the
  ``preprocessing`` the model does itself (e.g. pixels ÷ 255: ``act`` takes raw
  frames). Actions may also be MultiDiscrete, MultiBinary or a Box of any shape;
- ``model.safetensors``: the policy module's state dict under ``policy.``, and, when
  the run normalised observations, the running statistics ``obs_norm.mean``,
  ``obs_norm.var`` (float64, (obs_dim,)) and ``obs_norm.count`` ((1,)).

Acting is the trainer's greedy evaluation step for step:

    ŝ = clip((s − mean) / sqrt(var + 1e-8), −clip, clip)      (when normalised)
    a = π(ŝ)                                                  (the kind's rule)
    a ← clip(a, low, high)                                    (Box actions; no squashing)

A recurrent policy (PPO with ``ppo.lstm``; ``architecture.lstm`` records its sizes)
takes its state explicitly: ``state = policy.initial_state(N)`` (zeros) at the start,
then ``action, state = policy.act(obs, state=state)`` each step; a new episode starts
from zeros again (zero the rows of the envs that reset, or call ``initial_state``).

computed by the same snapshot of the model the trainer evaluates with, so
actions (and the returns of seeded episodes) match ``rlprox eval`` exactly. This module
needs torch, numpy and safetensors only: no gymnasium, accelerate, recipes or trainers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlprox.spaces import action_space_config  # noqa: F401  (exported policies' action entry)

FORMAT = "rlprox-policy"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OBS_EPSILON = 1e-8  # as rlprox.gymenv.RunningMeanStd.normalize


def save_policy(
    out_dir: str | Path,
    module,
    kind: str,
    architecture: dict,
    obs_dim: int,
    action: dict,
    deterministic_action: str,
    obs_stats: tuple | None = None,
    clip_obs: float = 10.0,
    extra: dict | None = None,
    layout: list[dict] | None = None,
) -> list[Path]:
    """Write ``config.json`` and ``model.safetensors`` of a policy folder; returns both
    paths. ``obs_stats``: (mean, var, count) of the observation normaliser, or None."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"policy.{k}": v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    if obs_stats is not None:
        mean, var, count = obs_stats
        tensors["obs_norm.mean"] = torch.from_numpy(np.asarray(mean, np.float64).copy())
        tensors["obs_norm.var"] = torch.from_numpy(np.asarray(var, np.float64).copy())
        tensors["obs_norm.count"] = torch.tensor([float(count)], dtype=torch.float64)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "architecture": architecture,
        "observation": {
            "dim": int(obs_dim),
            "normalize": obs_stats is not None,
            "clip": float(clip_obs),
            **({"layout": layout} if layout is not None else {}),
        },
        "action": action,
        "deterministic_action": deterministic_action,
        **(extra or {}),
    }
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return [out / CONFIG_NAME, out / WEIGHTS_NAME]


def is_policy_folder(path: str | Path) -> bool:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _build_module(config: dict):
    """The torch module of ``config["kind"]`` with the exported architecture."""
    arch, obs_dim, action = config["architecture"], config["observation"]["dim"], config["action"]
    discrete = action["type"] == "discrete"
    action_dim = action["n"] if discrete else action["dim"]
    if config["kind"] == "actor_critic":
        from rlprox.models.actor_critic import ActorCritic
        from rlprox.spaces import ActionSpace

        space = ActionSpace.from_config(action)
        if "encoder" in arch:
            from rlprox.models.encoders import build_actor_critic

            layout = config["observation"].get("layout") or [{"key": None, "shape": [obs_dim], "pixels": None}]
            return build_actor_critic(
                layout,
                space,
                arch["encoder"],
                arch["encoder_kwargs"],
                arch["hidden_sizes"],
                arch["activation"],
                lstm=arch.get("lstm"),
            )
        return ActorCritic(obs_dim, space.dim, space.discrete, arch["hidden_sizes"], arch["activation"], space=space)
    if config["kind"] == "flow":
        from rlprox.models.flow_policy import FlowPolicy

        lo, hi = arch["log_std_bounds"]
        return FlowPolicy(
            obs_dim,
            action_dim,
            arch["hidden_sizes"],
            arch["activation"],
            arch["time_features"],
            arch["obs_embed"],
            arch["critic_sizes"],
            0.5 * (lo + hi),  # any σ inside the bounds: the weights set it
            (lo, hi),
        )
    raise ValueError(f"unknown policy kind {config['kind']!r} (known: actor_critic, flow)")


class Policy:
    """An exported policy: ``act(obs)`` maps raw env observations to env actions; a
    recurrent one (``recurrent``) ``act(obs, state=state) -> (action, state)``."""

    def __init__(self, config: dict, module, obs_stats: tuple | None):
        self.config, self.module = config, module.eval()
        self.obs_dim = int(config["observation"]["dim"])
        self.clip_obs = float(config["observation"]["clip"])
        self.layout = config["observation"].get("layout")
        self.obs_mean, self.obs_var = (obs_stats[0], obs_stats[1]) if obs_stats is not None else (None, None)
        from rlprox.spaces import ActionSpace

        self.space = ActionSpace.from_config(config["action"])
        self.discrete = self.space.discrete
        self.recurrent = "lstm" in config["architecture"]
        if config["kind"] == "flow":
            arch = config["architecture"]
            self.snapshot = module.snapshot(arch["flow_steps"], arch["noise_scale"], arch.get("gaussian_head", True))
        else:
            self.snapshot = module.snapshot()

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """The observation the network sees: (N, obs_dim) float32."""
        if self.obs_mean is None:
            return obs
        return np.clip(
            (obs - self.obs_mean) / np.sqrt(self.obs_var + OBS_EPSILON), -self.clip_obs, self.clip_obs
        ).astype(np.float32)

    def initial_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """A recurrent policy's state at the start of ``batch`` episodes: (h, c), each
        float32 zeros of shape (num_layers, batch, state_size): state_size is the LSTM's
        hidden_size, twice that with a separate critic LSTM (the actor's half first)."""
        if not self.recurrent:
            raise ValueError("this policy is not recurrent: act(obs) takes no state")
        shape = (self.snapshot.module.num_layers, batch, self.snapshot.module.state_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def act(
        self,
        obs,
        deterministic: bool = True,
        rng: np.random.Generator | None = None,
        state: tuple | None = None,
    ):
        """Env actions for raw observations: a batch (N, obs_dim) gives (N,) ints
        (Discrete) or (N, dim) floats clipped to the Box; a single observation
        (obs_dim,) gives one int or a (dim,) array. Observations with a layout (images,
        Dict) are given as the env returns them: (N, *shape) or (*shape), a dict of
        such arrays for a Dict; other action spaces give the env's action per row
        (MultiDiscrete ints, MultiBinary int8, a Box reshaped to its shape).
        ``deterministic=False`` samples from the policy with ``rng`` (a fresh generator
        when None). A recurrent policy returns ``(action, state)``: ``state`` is the (h, c)
        of ``initial_state`` or of the previous call (None: ``initial_state``), the
        returned one is the state after this step."""
        if self.layout is not None:
            from rlprox.spaces import flatten_any

            batch, single = flatten_any(self.layout, obs)
        else:
            obs = np.asarray(obs, np.float32)
            single = obs.ndim == 1
            batch = obs.reshape(1 if single else len(obs), -1)
            if batch.shape[1] != self.obs_dim:
                raise ValueError(
                    f"observations must be (N, {self.obs_dim}) or ({self.obs_dim},) (got shape {tuple(obs.shape)})"
                )
        rng = np.random.default_rng() if rng is None else rng
        if self.recurrent:
            return self._act_recurrent(batch, single, deterministic, rng, state)
        if state is not None:
            raise ValueError("this policy is not recurrent: act(obs) takes no state")
        action = self.space.to_env(self.snapshot.act(self.normalize(batch), rng, deterministic=deterministic)[0])
        return self._unbatch(action, single)

    def _unbatch(self, action, single: bool):
        if single:
            return int(action[0]) if self.discrete else action[0]
        return action

    def _act_recurrent(self, batch, single, deterministic, rng, state):
        import torch

        state = self.initial_state(len(batch)) if state is None else state
        h, c = (torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in state)
        if h.ndim != 3 or h.shape[1] != len(batch) or h.shape != c.shape:
            raise ValueError(
                f"state must be (h, c), each (num_layers, {len(batch)}, state_size) (got {tuple(h.shape)})"
            )
        action, _, _, (h, c) = self.snapshot.step(self.normalize(batch), (h, c), rng, deterministic)
        return self._unbatch(self.space.to_env(action), single), (h.numpy(), c.numpy())

    __call__ = act


def load_policy(path: str | Path) -> Policy:
    """The policy of a folder written by ``rlprox export`` (PPO, PolicyFlow)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_policy_folder(path):
        raise FileNotFoundError(f"{path} is not an exported rlprox policy (no {CONFIG_NAME} with format {FORMAT!r})")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("version", VERSION) > VERSION:
        raise ValueError(f"{path}: policy format version {config['version']} is newer than this rlprox reads")
    tensors = load_file(str(path / WEIGHTS_NAME))
    module = _build_module(config)
    module.load_state_dict({k[len("policy.") :]: v for k, v in tensors.items() if k.startswith("policy.")})
    obs_stats = None
    if "obs_norm.mean" in tensors:
        obs_stats = tuple(tensors[f"obs_norm.{k}"].numpy() for k in ("mean", "var", "count"))
    return Policy(config, module, obs_stats)
