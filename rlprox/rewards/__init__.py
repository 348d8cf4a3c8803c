"""Reward registry and built-in rewards.

A reward is ``fn(images, prompts, metadata) -> Tensor[B]`` or ``(Tensor[B], dict)``
(the signature DDPO and TRL users know):

- ``images``: (B, 3, H, W) float in [0, 1]
- ``prompts``: B strings
- ``metadata``: B dicts (may be empty)

A video reward has the same form with ``videos`` (B, T, 3, H, W) in [0, 1] first. A reward
declares what it scores in its ``media`` attribute (``register_reward(name, media=...)`` sets
it): "image" (a plain function), "video", or "any" (takes either, e.g. ``http``). An image
reward scores a video model's clips frame by frame when the recipe names a reduction over the
frames (``RewardTerm.frames``: mean, min, first or last).

Register with ``@register_reward("name")`` (the first docstring line is the description
``list_rewards`` shows); look up with ``get_reward("name", **kwargs)`` or
``get_reward("package.module:function", **kwargs)``. Keyword arguments are bound to the
function (checked against its signature) and passed on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import torch

from rlprox.errors import RegistryError, RewardError, did_you_mean
from rlprox.registry import Registry

RewardFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict]"]
# rewards in their own modules, imported on first lookup (a recipe that does not name them never loads them)
REWARDS = Registry(
    "reward",
    lazy={
        "http": "rlprox.rewards.remote",
        "clip_score": "rlprox.rewards.clip",
        "pickscore": "rlprox.rewards.clip",
        "hpsv2": "rlprox.rewards.hps",
        "temporal_consistency": "rlprox.rewards.video",
        "digits_video_alignment": "rlprox.rewards.video",
    },
)
CALL_ARGS = ("images", "prompts", "metadata")
VIDEO_CALL_ARGS = ("videos", "prompts", "metadata")
MEDIA = ("image", "video", "any")  # what a reward scores: images (B, 3, H, W), videos (B, T, 3, H, W), either
FRAME_REDUCTIONS = ("mean", "min", "first", "last")  # an image reward's scores of a clip's frames -> one score

__all__ = [
    "REWARDS",
    "register_reward",
    "get_reward",
    "list_rewards",
    "digits_alignment",
    "brightness",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "aesthetic",
    "pixel_reconstruction",
    "ssim",
    "RewardTerm",
    "RewardSpec",
    "BoundReward",
    "reward_media",
    "WeightedReward",
    "build_reward",
]


def register_reward(name: str, media: str = "image") -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``get_reward(name)``; ``media`` (one of ``MEDIA``) is what
    it scores, kept as ``fn.media``."""
    if media not in MEDIA:
        raise ValueError(f"register_reward: media must be one of {', '.join(MEDIA)} (got {media!r})")

    def register(fn: RewardFn) -> RewardFn:
        fn.media = media
        return REWARDS.register(name)(fn)

    return register


def reward_media(fn) -> str:
    """What a reward scores: its ``media`` attribute, "image" for a plain function."""
    return getattr(fn, "media", "image")


def list_rewards() -> dict[str, str]:
    """{name: one-line description} of the registered rewards."""
    return REWARDS.describe()


def get_reward(name: str, **kwargs) -> RewardFn:
    """A reward callable by registered name or ``"module:function"``, with ``kwargs`` bound.

    Raises a one-line ``ValueError`` for unknown names (with a did-you-mean) and for
    keyword arguments the reward does not accept.
    """
    try:
        return REWARDS.bind(name, kwargs, reserved=CALL_ARGS + VIDEO_CALL_ARGS)
    except RegistryError as err:
        raise ValueError(str(err)) from None


# ----------------------------------------------------------------------------- built-ins
@register_reward("brightness")
def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value of each image (a trivial reward for tests and smoke runs)."""
    return images.float().mean(dim=(1, 2, 3))


@functools.lru_cache(maxsize=4)
def _classifier(spec: str, seed: int):
    from rlprox.zoo.build import resolve_path
    from rlprox.zoo.classifier import DigitsClassifier

    return DigitsClassifier.from_pretrained(resolve_path(spec, seed=seed))


@register_reward("digits_alignment")
def digits_alignment(
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    classifier: str = "zoo:digits-classifier",
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """P(prompted digit)·P(prompted colour) under the digits-classifier (digits world).

    ``classifier`` is a zoo spec (built on first use) or a local directory. The target
    is read from ``metadata[i]["digit"]``/``["colour"]`` when present, else parsed from
    the prompt ("a red seven"). Also returns digit/colour accuracy of the argmaxes.
    """
    from rlprox.zoo.data import COLOUR_NAMES, parse_prompt

    targets = []
    for prompt, meta in zip(prompts, metadata or [{}] * len(prompts)):
        if meta and "digit" in meta and "colour" in meta:
            colour = meta["colour"]
            targets.append(
                (int(meta["digit"]), COLOUR_NAMES.index(colour) if isinstance(colour, str) else int(colour))
            )
        else:
            targets.append(parse_prompt(prompt))
    digits = torch.tensor([d for d, _ in targets])
    colours = torch.tensor([c for _, c in targets])
    model = _classifier(classifier, seed).to(images.device)
    p_digit, p_colour = model.predict_proba(images.float())
    p_digit, p_colour = p_digit.cpu(), p_colour.cpu()
    reward = p_digit.gather(1, digits[:, None])[:, 0] * p_colour.gather(1, colours[:, None])[:, 0]
    stats = {
        "digit_acc": (p_digit.argmax(-1) == digits).float().mean().item(),
        "colour_acc": (p_colour.argmax(-1) == colours).float().mean().item(),
    }
    return reward.to(images.device), stats


@register_reward("jpeg_compressibility")
def jpeg_compressibility(
    images: torch.Tensor, prompts: list[str], metadata: list[dict], quality: int = 95
) -> torch.Tensor:
    """−(JPEG size in kB) of each image at the given quality: smaller files score higher (DDPO's compressibility)."""
    return -_jpeg_kilobytes(images, quality).to(images.device)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(
    images: torch.Tensor, prompts: list[str], metadata: list[dict], quality: int = 95
) -> torch.Tensor:
    """JPEG size in kB of each image at the given quality: larger files score higher (DDPO's incompressibility)."""
    return _jpeg_kilobytes(images, quality).to(images.device)


def _jpeg_kilobytes(images: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    from rlprox.images import to_uint8

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


# ----------------------------------------------------------------------------- aesthetic
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (layout of its ``sac+logos+ava1-l14-linearMSE.pth``:
    ``layers.{0,2,4,6,7}``) on L2-normalised CLIP image embeddings."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _check_aesthetic_paths(clip_path: str = "", mlp_path: str = "") -> None:
    hint = (
        "download openai/clip-vit-large-patch14 and the LAION sac+logos+ava1-l14-linearMSE.pth "
        "once, then set reward kwargs clip_path / mlp_path to the local copies"
    )
    if not clip_path or not Path(clip_path).is_dir():
        raise ValueError(f"reward 'aesthetic': clip_path {clip_path!r} is not a local CLIP model folder ({hint})")
    if not mlp_path or not Path(mlp_path).is_file():
        raise ValueError(f"reward 'aesthetic': mlp_path {mlp_path!r} is not a local file ({hint})")


@functools.lru_cache(maxsize=2)
def _aesthetic_models(clip_path: str, mlp_path: str):
    from transformers import CLIPModel

    _check_aesthetic_paths(clip_path, mlp_path)
    clip = CLIPModel.from_pretrained(clip_path, local_files_only=True).eval().requires_grad_(False)
    if mlp_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(mlp_path)
    else:
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(clip.config.projection_dim)
    mlp.load_state_dict(state)
    return clip, mlp.eval().requires_grad_(False)


@register_reward("aesthetic")
def aesthetic(
    images: torch.Tensor, prompts: list[str], metadata: list[dict], clip_path: str = "", mlp_path: str = ""
) -> torch.Tensor:
    """LAION improved-aesthetic score: an MLP on CLIP image embeddings (weights from local paths only)."""
    import torch.nn.functional as F

    clip, mlp = _aesthetic_models(clip_path, mlp_path)
    clip, mlp = clip.to(images.device), mlp.to(images.device)
    size = clip.config.vision_config.image_size
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=(x - mean) / std)
        features = getattr(features, "pooler_output", features)  # a tensor, or an output object in newer transformers
        features = features / features.norm(dim=-1, keepdim=True)
        return mlp(features.float())[:, 0]


aesthetic.preflight = _check_aesthetic_paths
aesthetic.preload = lambda clip_path="", mlp_path="": _aesthetic_models(clip_path, mlp_path)


# ----------------------------------------------------------------------------- pixel reconstruction


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004, Gaussian window, C1 = 0.01²,
    C2 = 0.03² for images in [0, 1]); x, y (B, 3, H, W) -> (B,). The window shrinks to
    the image for tiny images."""
    import torch.nn.functional as F

    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


@register_reward("pixel_reconstruction")
def pixel_reconstruction(
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    mse_weight: float = 1.0,
    ssim_weight: float = 0.0,
    shuffle_seed: int | None = None,
    perceptual_weight: float = 0.0,
    perceptual: str = "zoo:digits-vq",
) -> tuple[torch.Tensor, dict]:
    """−(w_mse·MSE + w_ssim·(1 − SSIM) + w_p·d_p) of each image against ``metadata[i]["reference"]`` (VA-π's
    reward). d_p, the perceptual term (``perceptual_weight`` w_p > 0): an LPIPS-form distance between the
    features of ``perceptual``'s encoder (a VQ folder or zoo:digits-vq; not the digits classifier behind
    the FID/IS proxies), ``rlprox.rewards.perceptual.encoder_feature_distance``.

    ``shuffle_seed`` (a control without the reward signal): the batch's scores are handed out in a
    random order, a permutation drawn from (shuffle_seed, the images' bytes), so each image gets a score
    of the same scale that says nothing about it; the info keeps the true MSE/SSIM."""
    reference = torch.stack([m["reference"] for m in metadata]).to(images.device).float()
    mse = ((images.float() - reference) ** 2).mean(dim=(1, 2, 3))
    reward = -mse_weight * mse
    info = {"mse": float(mse.mean())}
    if ssim_weight:
        similarity = ssim(images, reference)
        reward = reward - ssim_weight * (1.0 - similarity)
        info["ssim"] = float(similarity.mean())
    if perceptual_weight:
        from rlprox.rewards.perceptual import encoder_feature_distance

        distance = encoder_feature_distance(perceptual, images, reference)
        reward = reward - perceptual_weight * distance
        info["perceptual"] = float(distance.mean())
    if shuffle_seed is not None:
        reward = reward[_content_permutation(images, int(shuffle_seed)).to(reward.device)]
    return reward, info


def _content_permutation(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of the batch drawn from a generator seeded by ``seed`` and a hash of the images:
    new every round, the same on a resumed run (no generator state to checkpoint)."""
    import hashlib

    digest = hashlib.sha256(images.detach().float().cpu().numpy().tobytes()).digest()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + int.from_bytes(digest[:6], "little"))
    return torch.randperm(images.shape[0], generator=generator)


def _check_classifier_name(classifier: str = "zoo:digits-classifier", seed: int = 0) -> None:
    from rlprox.zoo.build import check_spec

    try:
        check_spec(classifier, ("digits-classifier",))
    except ValueError as err:
        raise ValueError(f"reward 'digits_alignment': classifier: {err}") from None


def _check_classifier_path(classifier: str = "zoo:digits-classifier", seed: int = 0) -> None:
    if not str(classifier).startswith("zoo:") and not (Path(classifier) / "config.json").is_file():
        raise ValueError(
            f"reward 'digits_alignment': classifier {classifier!r} is not a digits-classifier folder nor zoo:NAME"
        )


def _check_pixel_reconstruction(perceptual: str = "zoo:digits-vq", perceptual_weight: float = 0.0, **_) -> None:
    from rlprox.rewards.perceptual import check_perceptual

    check_perceptual(perceptual, perceptual_weight)


def _preload_pixel_reconstruction(perceptual: str = "zoo:digits-vq", perceptual_weight: float = 0.0, **_) -> None:
    if perceptual_weight:
        from rlprox.rewards.perceptual import vq_encoder

        vq_encoder(perceptual)


pixel_reconstruction.check = _check_pixel_reconstruction
pixel_reconstruction.preload = _preload_pixel_reconstruction
digits_alignment.check = _check_classifier_name
digits_alignment.preflight = _check_classifier_path
digits_alignment.preload = lambda classifier="zoo:digits-classifier", seed=0: _classifier(classifier, seed)


# ----------------------------------------------------------------------------- recipe side
@dataclass
class RewardTerm:
    """One reward of the recipe's ``reward:`` section."""

    name: str  # a registered reward (rlprox rewards) or "module:function"
    weight: float = 1.0  # weight in the sum of several rewards
    kwargs: dict = field(default_factory=dict)  # options bound to the function
    # a video model with an image reward: score every frame, then reduce a clip's T scores to one (mean, min) or
    # score one frame only (first, last); unset for a video reward and for an image model
    frames: Literal["mean", "min", "first", "last"] | None = None


RewardSpec = Union[str, RewardTerm, list[RewardTerm]]  # "name", {name, weight, kwargs, frames}, or a list of them


def _terms(spec) -> list[RewardTerm]:
    if isinstance(spec, str):
        return [RewardTerm(spec)]
    if isinstance(spec, RewardTerm):
        return [spec]
    if isinstance(spec, dict):
        return [RewardTerm(**spec)]
    terms = [t if isinstance(t, RewardTerm) else RewardTerm(**t) for t in spec]
    if not terms:
        raise ValueError("no reward given")
    return terms


@dataclass(frozen=True)
class BoundReward:
    """One term of a ``WeightedReward``: the callable with its options bound, and what it scores."""

    name: str  # as the recipe names it
    weight: float  # its weight in the sum
    fn: RewardFn  # the reward, kwargs bound
    media: str = "image"  # one of MEDIA
    frames: str | None = None  # one of FRAME_REDUCTIONS: an image reward applied to each frame of a video


def _check_frames(name: str, media: str, frames: str | None) -> None:
    """A reduction over frames only for a reward that scores images (ValueError, one line)."""
    if frames is None:
        return
    if frames not in FRAME_REDUCTIONS:
        raise ValueError(
            f"reward {name!r}: frames must be one of {', '.join(FRAME_REDUCTIONS)} (got {frames!r})"
            f"{did_you_mean(str(frames), FRAME_REDUCTIONS)}"
        )
    if media == "video":
        raise ValueError(f"reward {name!r} scores whole videos: frames reduces an image reward's frames (remove it)")


class WeightedReward:
    """Σ_i w_i·r_i(images, prompts, metadata), every term's output checked: a reward
    that raises, returns a wrong shape, a tensor on a device other than the images'
    or the CPU (``meta`` included), or nothing finite stops the run with one line
    (``RewardError``) naming it and what it returned; a ``RewardError`` the reward raises
    itself passes unchanged (it already names the reward). Individual non-finite values
    pass through (the advantage leaves them out and the stats count them).

    ``images`` may be videos (B, T, 3, H, W): a video reward gets them whole, an image reward
    with a ``frames`` reduction gets the frames, r = reduce_t r(frame_t); an image reward without
    one, a video reward on images, or ``frames`` on images is a one-line ``RewardError``."""

    def __init__(self, terms: list):
        self.terms = [t if isinstance(t, BoundReward) else BoundReward(*t) for t in terms]

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict]:
        n, video = images.shape[0], images.ndim == 5
        total = torch.zeros(n, dtype=torch.float32)
        info: dict[str, float] = {}
        for term in self.terms:
            _check_pairing(term, video)
            if video and term.frames is not None:
                values, extra = _score_frames(term, images, prompts, metadata)
            else:
                values, extra = _score(term, images, prompts, metadata, "videos" if video else "images")
            total = total + term.weight * values
            prefix = f"{term.name.split(':')[-1]}/" if len(self.terms) > 1 else ""
            info.update({f"{prefix}{k}": float(v) for k, v in (extra or {}).items() if isinstance(v, (int, float))})
        return total, info


def _check_pairing(term: BoundReward, video: bool) -> None:
    name = term.name
    if not video and term.media == "video":
        raise RewardError(f"reward {name!r} scores videos (B, T, 3, H, W) and this model makes images")
    if not video and term.frames is not None:
        raise RewardError(f"reward.frames: reward {name!r} reduces a video's frames and this model makes images")
    if video and term.media == "image" and term.frames is None:
        raise RewardError(
            f"reward.frames: reward {name!r} scores images and this model makes videos: set frames to "
            f"{', '.join(FRAME_REDUCTIONS)} to score each frame and reduce"
        )


def _score_frames(term: BoundReward, videos: torch.Tensor, prompts: list[str], metadata: list[dict]):
    """An image reward on a batch of clips: every frame (mean, min over the T scores) or one (first, last)."""
    B, T = videos.shape[:2]
    if term.frames in ("first", "last"):
        return _score(term, videos[:, 0 if term.frames == "first" else -1], prompts, metadata, "frames")
    metadata = metadata or [{} for _ in prompts]
    frames = videos.flatten(0, 1)  # (B·T, 3, H, W), clip major
    values, extra = _score(
        term,
        frames,
        [p for p in prompts for _ in range(T)],
        [m for m in metadata for _ in range(T)],
        "frames",
    )
    per_clip = values.view(B, T)
    return (per_clip.mean(1) if term.frames == "mean" else per_clip.amin(1)), extra


def _score(term: BoundReward, images: torch.Tensor, prompts: list[str], metadata: list[dict], what: str):
    """(values (n,) float32 on the CPU, the reward's stats) of one call, checked."""
    name, n = term.name, images.shape[0]
    try:
        out = term.fn(images, prompts, metadata)
    except RewardError:  # already one line naming the reward
        raise
    except Exception as err:  # noqa: BLE001  (a plugin may raise anything)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {first}") from None
    values, extra = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if torch.is_tensor(values) and values.device.type != "cpu" and values.device != images.device:
        expected = "cpu" if images.device.type == "cpu" else f"{images.device} (the images' device) or cpu"
        raise RewardError(f"reward {name!r} returned a tensor on device {values.device}; expected {expected}")
    try:
        values = torch.as_tensor(values).detach().float().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise RewardError(f"reward {name!r} returned a {type(values).__name__}, not a tensor of {n} rewards") from None
    if tuple(values.shape) != (n,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)} for {n} {what}; expected ({n},)")
    if not torch.isfinite(values).any():
        raise RewardError(f"reward {name!r} returned no finite value for {n} {what} (all NaN/inf)")
    return values, extra


def build_reward(spec, device=None, check_only: bool = False, media: str | None = None) -> WeightedReward | None:
    """The recipe's reward section as a ``WeightedReward``. Names and options are
    checked first, with the reward's own ``check`` of its options if it has one
    (ValueError, one line), and a ``frames`` reduction only on a reward that scores
    images; with ``media`` ("image" or "video": what the model makes, when known
    before sampling) each reward must score it (a video reward on an image model, an
    image reward on a video model without ``frames``: one line). ``check_only`` stops there. Otherwise each reward's
    ``preflight`` runs (e.g. that its local weight files exist) and rewards with a
    ``preload`` load their models now: the engine builds trainers under
    ``main_process_first``, so one process builds a missing zoo model, before any hook
    runs (a reward is called under ``no_grad``, maybe in a worker thread)."""
    terms = []
    for term in _terms(spec):
        fn = get_reward(term.name, **term.kwargs)
        base = REWARDS.get(term.name)
        _check_frames(term.name, reward_media(base), term.frames)
        bound = BoundReward(term.name, float(term.weight), fn, reward_media(base), term.frames)
        if media is not None:
            _check_pairing(bound, media == "video")
        for step in ("check",) if check_only else ("check", "preflight", "preload"):
            if getattr(base, step, None) is not None:
                getattr(base, step)(**term.kwargs)
        terms.append(bound)
    return None if check_only else WeightedReward(terms)
