"""Observation trunks of ``SharedActorCritic``, chosen by the observation space
(``rlprox.spaces`` layouts), and ``build_actor_critic``, which picks the PPO model.

- image Box (uint8): ``NatureCNN`` (Mnih et al. 2015, as CleanRL's ``ppo_atari.py``):
  x/255 → conv 32 8×8 s4 → conv 64 4×4 s2 → conv 64 3×3 s1 → Linear(·, 512), ReLU
  after each, orthogonal init with gain √2. The scaling and the channels-first
  permutation happen inside the model, so an exported policy takes raw frames.
- vector Box inside a Dict: ``VectorEncoder``, an MLP of ``hidden_sizes`` (activation
  after every layer, gain √2);
- Dict: one encoder per key, features concatenated (``KeyedTrunk``);
- ``"module:Class"``: the user's module, built as ``Class(observation_shape, **kwargs)``
  (a shape tuple for a Box, a dict of them for a Dict) with an ``out_features`` int;
  it receives float32 tensors (B, *shape) (a dict of them for a Dict) of the env's
  values, unscaled (``UserTrunk``).

A vector Box observation keeps ``ActorCritic``'s separate actor and critic MLPs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlprox.errors import RecipeError, RegistryError, did_you_mean
from rlprox.models.actor_critic import ACTIVATIONS, ActorCritic, SharedActorCritic, orthogonal
from rlprox.spaces import ActionSpace, describe_entry, has_images, is_plain_vector, widths

BUILTIN = ("auto", "mlp", "nature_cnn")
NATURE_MIN_SIZE = 36  # the smallest H = W the three convolutions reduce to 1×1


def split_observation(layout: list[dict], obs: torch.Tensor) -> list[torch.Tensor]:
    """The flat (B, obs_dim) observation cut into the layout's arrays, each (B, *shape)."""
    parts = torch.split(obs, widths(layout), dim=-1)
    return [p.reshape(len(obs), *e["shape"]) for p, e in zip(parts, layout)]


def image_geometry(entry: dict) -> tuple[int, int, int]:
    """(C, H, W) an image entry is fed to the convolutions as."""
    shape, code = entry["shape"], entry["pixels"]
    if code == "HW":
        return 1, shape[0], shape[1]
    if code == "HWC":
        return shape[2], shape[0], shape[1]
    if code == "CHW":
        return shape[0], shape[1], shape[2]
    return shape[0] * shape[3], shape[1], shape[2]  # SHWC: the stack's channels side by side


class NatureCNN(nn.Module):
    """Pixels (B, *shape) in [0, 255] → features (B, 512)."""

    def __init__(self, entry: dict):
        super().__init__()
        self.pixels = entry["pixels"]
        c, h, w = self.geometry = image_geometry(entry)
        gain = math.sqrt(2.0)
        self.conv = nn.Sequential(
            orthogonal(nn.Conv2d(c, 32, 8, stride=4), gain),
            nn.ReLU(),
            orthogonal(nn.Conv2d(32, 64, 4, stride=2), gain),
            nn.ReLU(),
            orthogonal(nn.Conv2d(64, 64, 3, stride=1), gain),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, c, h, w)).shape[1]
        self.linear = orthogonal(nn.Linear(flat, 512), gain)
        self.out_features = 512

    def channels_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixels == "HW":
            return x.unsqueeze(1)
        if self.pixels == "HWC":
            return x.permute(0, 3, 1, 2)
        if self.pixels == "SHWC":
            b, s, h, w, c = x.shape
            return x.permute(0, 1, 4, 2, 3).reshape(b, s * c, h, w)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channels_first(x) / 255.0
        return torch.relu(self.linear(self.conv(x)))


class VectorEncoder(nn.Module):
    """A vector (B, *shape) → features (B, hidden_sizes[-1]): flatten, then an MLP with
    the activation after every layer."""

    def __init__(self, entry: dict, hidden_sizes, activation: str):
        super().__init__()
        act = ACTIVATIONS[activation][0]
        layers: list[nn.Module] = [nn.Flatten()]
        sizes = [int(math.prod(entry["shape"])), *hidden_sizes]
        for i in range(len(sizes) - 1):
            layers += [orthogonal(nn.Linear(sizes[i], sizes[i + 1]), math.sqrt(2.0)), act()]
        self.mlp = nn.Sequential(*layers)
        self.out_features = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class KeyedTrunk(nn.Module):
    """One encoder per layout entry (a Box, or a Dict key), features concatenated."""

    def __init__(self, layout: list[dict], encoders: list[nn.Module]):
        super().__init__()
        self.layout = layout
        self.encoders = nn.ModuleList(encoders)
        self.out_features = sum(e.out_features for e in encoders)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        parts = split_observation(self.layout, obs)
        return torch.cat([enc(x) for enc, x in zip(self.encoders, parts)], dim=-1)


class UserTrunk(nn.Module):
    """A user's encoder: gets the observation as the space's shape (a dict for a Dict)."""

    def __init__(self, layout: list[dict], encoder: nn.Module):
        super().__init__()
        self.layout, self.encoder = layout, encoder
        self.out_features = int(encoder.out_features)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        parts = split_observation(self.layout, obs)
        if self.layout[0]["key"] is None:
            return self.encoder(parts[0])
        return self.encoder({e["key"]: x for e, x in zip(self.layout, parts)})


def observation_shape(layout: list[dict]):
    """What a user encoder's constructor receives: a Box's shape, or {key: shape} for a Dict."""
    if layout[0]["key"] is None:
        return tuple(layout[0]["shape"])
    return {e["key"]: tuple(e["shape"]) for e in layout}


def resolve_encoder(spec: str, key: str = "ppo.encoder"):
    """A built-in encoder name, or the class of a ``"module:Class"`` spec."""
    if ":" in spec:
        from rlprox.registry import resolve_object

        try:
            return resolve_object(spec, "encoder")
        except RegistryError as err:
            raise RecipeError(key, str(err)) from None
    if spec not in BUILTIN:
        raise RecipeError(
            key,
            f"unknown encoder {spec!r}{did_you_mean(spec, BUILTIN)}; known: {', '.join(BUILTIN)}, or 'module:Class'",
        )
    return spec


def check_nature_cnn(entry: dict, key: str) -> None:
    if entry["pixels"] is None:
        raise RecipeError(
            key,
            f"nature_cnn needs uint8 image observations (H×W×C or C×H×W); {describe_entry(entry)} is not one "
            "(use auto or mlp)",
        )
    _, h, w = image_geometry(entry)
    if min(h, w) < NATURE_MIN_SIZE:
        raise RecipeError(
            key,
            f"nature_cnn needs images of at least {NATURE_MIN_SIZE}×{NATURE_MIN_SIZE} pixels (its receptive field); "
            f"{describe_entry(entry)} is {h}×{w}",
        )


def build_actor_critic(
    layout: list[dict],
    space: ActionSpace,
    encoder: str = "auto",
    encoder_kwargs: dict | None = None,
    hidden_sizes=(64, 64),
    activation: str = "tanh",
    init_log_std: float = 0.0,
    key: str = "ppo.encoder",
    lstm: dict | None = None,
) -> nn.Module:
    """PPO's model for an observation layout: ``ActorCritic`` (separate MLPs) for a vector
    Box under ``auto`` or ``mlp``, else ``SharedActorCritic`` on the encoder's trunk. With
    ``lstm`` ({hidden_size, num_layers, critic}): ``RecurrentActorCritic`` (rlprox/models/recurrent.py)
    on the encoder's trunk, a vector Box getting an MLP trunk of ``hidden_sizes``. An
    encoder that does not fit the observation is a one-line recipe error naming ``key``."""
    kind = resolve_encoder(encoder, key)
    obs_dim = sum(widths(layout))
    single_box = layout[0]["key"] is None
    if kind == "mlp" and not single_box:
        raise RecipeError(key, "mlp takes a Box observation; a Dict gets one encoder per key under auto")
    if lstm is None and (kind == "mlp" or (kind == "auto" and single_box and not has_images(layout))):
        return ActorCritic(obs_dim, space.dim, space.discrete, hidden_sizes, activation, init_log_std, space=space)
    if kind in BUILTIN:
        encoders = []
        for entry in layout:
            if kind == "nature_cnn" or (kind == "auto" and entry["pixels"] is not None):
                check_nature_cnn(entry, key)
                encoders.append(NatureCNN(entry))
            else:
                encoders.append(VectorEncoder(entry, hidden_sizes, activation))
        trunk = KeyedTrunk(layout, encoders)
    else:
        trunk = UserTrunk(layout, build_user_encoder(kind, encoder, layout, encoder_kwargs or {}, key))
    if lstm is not None:
        from rlprox.models.recurrent import RecurrentActorCritic

        critic = lstm.get("critic", "shared")
        return RecurrentActorCritic(trunk, space, lstm["hidden_size"], lstm["num_layers"], init_log_std, critic)
    return SharedActorCritic(trunk, space, init_log_std)


def build_user_encoder(cls, spec: str, layout: list[dict], kwargs: dict, key: str) -> nn.Module:
    """``cls(observation_shape, **kwargs)``, checked: a module with an ``out_features``
    int that maps a zero observation to (1, out_features)."""
    from rlprox.registry import check_kwargs

    try:
        check_kwargs(cls, kwargs, f"encoder {spec!r}", reserved=("observation_shape",))
    except RegistryError as err:
        raise RecipeError(f"{key}_kwargs", str(err)) from None
    shape = observation_shape(layout)
    try:
        module = cls(shape, **kwargs)
    except Exception as err:  # the user's constructor: any failure is a recipe error
        raise RecipeError(key, f"{spec}({shape}) failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    width = getattr(module, "out_features", None)
    if not isinstance(module, nn.Module) or not isinstance(width, int) or width <= 0:
        raise RecipeError(
            key, f"{spec} must be a torch.nn.Module with a positive int out_features (the feature width)"
        )
    trunk = UserTrunk(layout, module)
    try:
        with torch.no_grad():
            out = trunk(torch.zeros(1, sum(widths(layout))))
    except Exception as err:
        raise RecipeError(
            key, f"{spec} does not fit the observation ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if tuple(out.shape) != (1, width):
        raise RecipeError(key, f"{spec} returned features of shape {tuple(out.shape)[1:]}, not ({width},)")
    return module


def architecture(layout: list[dict], encoder: str, encoder_kwargs: dict, lstm: dict | None = None) -> dict:
    """The export's record of the trunk (``rlprox.policy`` rebuilds the model from it),
    with what preprocessing the model itself does, and the LSTM's sizes (``lstm``)."""
    if is_plain_vector(layout) and encoder in ("auto", "mlp") and lstm is None:
        return {}
    images = [describe_entry(e) for e in layout if e["pixels"] is not None]
    kind = resolve_encoder(encoder)
    preprocessing = (
        "none: the user encoder gets the raw env values as float32"
        if kind not in BUILTIN
        else (
            f"inside the model: {', '.join(images)} as float ÷ 255, channels first; no observation normaliser"
            if images and kind != "mlp"
            else "none"
        )
    )
    out = {"encoder": encoder, "encoder_kwargs": dict(encoder_kwargs), "preprocessing": preprocessing}
    if lstm is not None:
        out["lstm"] = {
            "hidden_size": int(lstm["hidden_size"]),
            "num_layers": int(lstm["num_layers"]),
            "critic": lstm.get("critic", "shared"),
        }
    return out
