"""What the env-based trainers and exported policies need to know about gymnasium spaces,
as plain numpy and JSON (no gymnasium import outside the two ``of`` functions, so
``rlprox.policy`` can use it).

Observations: every observation is flattened into one float32 row (B, obs_dim) for the
rollout buffers, checkpoints and normalisers; its *layout* (a JSON list, one entry per
Box, in the Dict's key order) says how a model cuts the row back into the space's
arrays. An entry is ``{"key": name or None, "shape": [...], "pixels": code or None}``;
``pixels`` marks an image Box (dtype uint8, 2 to 4 axes): ``HW``, ``HWC`` (channels
last: the last axis is shorter than the first), ``CHW`` (frame stacks such as
(4, 84, 84)) or ``SHWC`` (a stack of channels-last frames).

Actions: ``ActionSpace`` describes Discrete, MultiDiscrete, MultiBinary and Box of any
shape: how many outputs the actor has (``dim``), how many buffer columns an action
takes (``columns``) and how a flat sampled action becomes the env's action (``to_env``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlprox.errors import RecipeError

OBSERVATIONS = "Box or Dict of Boxes"
ACTIONS = "Discrete, MultiDiscrete, MultiBinary and Box"


# ----------------------------------------------------------------------------- observations


def pixel_layout(shape: tuple[int, ...]) -> str | None:
    """The axis code of a uint8 image Box of ``shape``, or None when it has 1 or more than 4 axes."""
    if len(shape) == 2:
        return "HW"
    if len(shape) == 3:
        return "HWC" if shape[-1] < shape[0] else "CHW"
    if len(shape) == 4:
        return "SHWC"
    return None


def observation_layout(space, key: str = "env.id") -> list[dict]:
    """The layout of a Box or a Dict of Boxes (see module doc); any other space is a
    one-line recipe error naming it."""
    import gymnasium as gym

    def entry(name, box) -> dict:
        if not isinstance(box, gym.spaces.Box):
            where = f" (key {name!r})" if name is not None else ""
            raise RecipeError(
                key,
                f"{type(box).__name__} observations{where} are not supported (supported: {OBSERVATIONS}; got {box})",
            )
        shape = [int(s) for s in box.shape]
        pixels = pixel_layout(box.shape) if box.dtype == np.uint8 else None
        return {"key": name, "shape": shape, "pixels": pixels}

    if isinstance(space, gym.spaces.Dict):
        return [entry(name, sub) for name, sub in space.spaces.items()]
    return [entry(None, space)]


def is_plain_vector(layout: list[dict]) -> bool:
    """A single 1-D Box that is not an image: the observation of the original MLP policies."""
    return (
        len(layout) == 1 and layout[0]["key"] is None and layout[0]["pixels"] is None and len(layout[0]["shape"]) == 1
    )


def has_images(layout: list[dict]) -> bool:
    return any(e["pixels"] is not None for e in layout)


def widths(layout: list[dict]) -> list[int]:
    """Flat width of each entry (math.prod: a constant to torch.compile, where np.prod would break the graph)."""
    return [int(math.prod(e["shape"])) for e in layout]


def describe_entry(entry: dict) -> str:
    kind = "uint8 image" if entry["pixels"] else "vector"
    where = f"key {entry['key']!r}: " if entry["key"] is not None else ""
    return f"{where}{kind} Box{tuple(entry['shape'])}"


def flatten_batch(layout: list[dict], obs, n: int) -> np.ndarray:
    """A batch of ``n`` observations (an array, or a dict of arrays for a Dict space) as (n, obs_dim) float32."""
    if layout[0]["key"] is None:
        return np.asarray(obs, np.float32).reshape(n, -1)
    return np.concatenate([np.asarray(obs[e["key"]], np.float32).reshape(n, -1) for e in layout], axis=1)


def flatten_any(layout: list[dict], obs) -> tuple[np.ndarray, bool]:
    """(n, obs_dim) float32 and whether ``obs`` was one observation (no batch axis):
    ``obs`` an array of shape (*shape) or (n, *shape), or a dict of such arrays."""
    first = layout[0]
    value = obs if first["key"] is None else obs[first["key"]]
    value = np.asarray(value)
    single = value.ndim == len(first["shape"])
    n = 1 if single else len(value)
    for e in layout:
        got = np.asarray(obs if e["key"] is None else obs[e["key"]]).shape
        if tuple(got[-len(e["shape"]) :] if e["shape"] else ()) != tuple(e["shape"]) or len(got) > len(e["shape"]) + 1:
            raise ValueError(f"observation {describe_entry(e)} must have shape (N, *{tuple(e['shape'])}) (got {got})")
    return flatten_batch(layout, obs, n), single


# ----------------------------------------------------------------------------- actions


def _bounds(values: np.ndarray) -> list:
    """A Box bound for JSON: floats, ``None`` where unbounded."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64).ravel()]


def action_space_config(discrete: bool, dim: int, low=None, high=None) -> dict:
    """The ``action`` entry of config.json."""
    if discrete:
        return {"type": "discrete", "n": int(dim)}
    return {
        "type": "box",
        "dim": int(dim),
        "low": _bounds(low),
        "high": _bounds(high),
        "postprocess": "clip",  # actions are clipped to [low, high] before the env sees them; never squashed
    }


@dataclass(frozen=True)
class ActionSpace:
    """What a policy head needs to know about the env's actions."""

    kind: str  # discrete | multidiscrete | multibinary | box
    dim: int  # actor outputs: n logits, Σ nvec logits, one logit per bit, or the Box size
    columns: int  # columns an action takes in a (B, columns) buffer
    low: np.ndarray | None = None  # box: flat bounds
    high: np.ndarray | None = None
    shape: tuple[int, ...] = ()  # the env's action shape (box, multibinary, multidiscrete)
    nvec: tuple[int, ...] = ()  # multidiscrete: choices per component (flattened)
    start: int | tuple[int, ...] = 0  # discrete / multidiscrete: the first action's value

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"

    @staticmethod
    def simple(discrete: bool, dim: int) -> "ActionSpace":
        """Discrete(dim) or an unbounded 1-D Box(dim)."""
        if discrete:
            return ActionSpace("discrete", int(dim), 1)
        inf = np.full(dim, np.inf, np.float32)
        return ActionSpace("box", int(dim), int(dim), -inf, inf, (int(dim),))

    @staticmethod
    def of(space, key: str = "env.id") -> "ActionSpace":
        import gymnasium as gym

        s = gym.spaces
        if isinstance(space, s.Discrete):
            return ActionSpace("discrete", int(space.n), 1, start=int(space.start))
        if isinstance(space, s.MultiDiscrete):
            nvec = tuple(int(v) for v in np.asarray(space.nvec).ravel())
            start = tuple(int(v) for v in np.asarray(space.start).ravel())
            return ActionSpace("multidiscrete", sum(nvec), len(nvec), shape=tuple(space.shape), nvec=nvec, start=start)
        if isinstance(space, s.MultiBinary):
            n = int(np.prod(space.shape))
            return ActionSpace("multibinary", n, n, shape=tuple(int(d) for d in space.shape))
        if isinstance(space, s.Box):
            n = int(np.prod(space.shape))
            low, high = (np.asarray(b, np.float32).ravel() for b in (space.low, space.high))
            return ActionSpace("box", n, n, low, high, tuple(int(d) for d in space.shape))
        raise RecipeError(key, f"{type(space).__name__} actions are not supported (supported: {ACTIONS}; got {space})")

    def to_env(self, action: np.ndarray) -> np.ndarray:
        """The env's actions for a batch of flat sampled actions: Box actions clipped to
        the bounds and reshaped, integer components offset by the space's start."""
        if self.kind == "discrete":
            return action if self.start == 0 else action + self.start
        n = len(action)
        if self.kind == "box":
            action = np.clip(action, self.low, self.high)
            return action if len(self.shape) == 1 else action.reshape(n, *self.shape)
        if self.kind == "multidiscrete":
            return (action.astype(np.int64) + np.asarray(self.start, np.int64)).reshape(n, *self.shape)
        return action.astype(np.int8).reshape(n, *self.shape)  # multibinary

    def config(self) -> dict:
        """The ``action`` entry of an exported policy's config.json."""
        if self.kind in ("discrete", "box"):
            out = action_space_config(self.discrete, self.dim, self.low, self.high)
            if self.kind == "discrete" and self.start:
                out["start"] = self.start
            if self.kind == "box" and len(self.shape) != 1:
                out["shape"] = list(self.shape)
            return out
        if self.kind == "multidiscrete":
            return {
                "type": "multidiscrete",
                "nvec": list(self.nvec),
                "start": list(self.start),
                "shape": list(self.shape),
            }
        return {"type": "multibinary", "shape": list(self.shape)}

    @staticmethod
    def from_config(action: dict) -> "ActionSpace":
        kind = action["type"]
        if kind == "discrete":
            return ActionSpace("discrete", int(action["n"]), 1, start=int(action.get("start", 0)))
        if kind == "box":
            dim = int(action["dim"])
            low = np.array([-np.inf if v is None else v for v in action["low"]], np.float32)
            high = np.array([np.inf if v is None else v for v in action["high"]], np.float32)
            return ActionSpace("box", dim, dim, low, high, tuple(action.get("shape", [dim])))
        if kind == "multidiscrete":
            nvec = tuple(action["nvec"])
            return ActionSpace(
                kind, sum(nvec), len(nvec), shape=tuple(action["shape"]), nvec=nvec, start=tuple(action["start"])
            )
        if kind == "multibinary":
            n = int(np.prod(action["shape"]))
            return ActionSpace(kind, n, n, shape=tuple(action["shape"]))
        raise ValueError(f"unknown action type {kind!r} (known: discrete, box, multidiscrete, multibinary)")
