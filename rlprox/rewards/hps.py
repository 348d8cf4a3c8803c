"""HPSv2 from a local checkpoint file: the ``hpsv2`` reward.

HPS v2 and v2.1 (Wu et al. 2023) are fine-tunes of OpenCLIP ViT-H-14. The score of
image x_i for prompt c_i is the cosine of the two towers' outputs,
hps_i = ⟨E_I(x_i), E_T(c_i)⟩ / (‖E_I(x_i)‖·‖E_T(c_i)‖), with no logit scale (hpsv2's
``img_score.py``: the diagonal of ``image_features @ text_features.T`` of the normalised
features).

open_clip (the ``[hpsv2]`` extra) builds the network from its bundled architecture
config, and nothing is downloaded. The weights load once, when the reward is built, and
only from ``checkpoint_path`` (given to open_clip as an absolute file path, never as a
pretrained tag): ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``, a dict holding a
``state_dict``. Prompts go through
open_clip's own BPE tokenizer, whose vocabulary ships inside the package. Images get
hpsv2's evaluation transform, done in torch on floats in [0, 1] (no 8-bit rounding):
the longer side is resized to the model's input size (bicubic, antialiased, as
torchvision ≥ 0.17 resizes a tensor), the shorter side is zero-padded (black) around the
centre, then CLIP's mean/std is applied.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from rlprox.rewards import CLIP_MEAN, CLIP_STD, register_reward

__all__ = ["hpsv2", "hps_pixels", "load_hps"]

HINT = "download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) once and set checkpoint_path to the local file"


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _open_clip():
    try:
        import open_clip
    except Exception as err:  # noqa: BLE001  (a broken torchvision fails at import with anything)
        problem = _one_line(err)
        raise ValueError(f"reward hpsv2: cannot import open_clip ({problem}); pip install 'rlprox[hpsv2]'") from None
    return open_clip


def _check(checkpoint_path: str = "", model: str = "ViT-H-14") -> None:
    if not isinstance(checkpoint_path, str) or not checkpoint_path:
        raise ValueError(
            f"reward hpsv2: checkpoint_path must be a local HPS checkpoint file (got {checkpoint_path!r})"
        )
    if not isinstance(model, str) or not model or ":" in model:
        raise ValueError(
            f"reward hpsv2: model must be an open_clip architecture name such as 'ViT-H-14' (got {model!r})"
        )


def _preflight(checkpoint_path: str = "", model: str = "ViT-H-14") -> None:
    _check(checkpoint_path, model)
    if not Path(checkpoint_path).is_file():
        raise ValueError(f"reward hpsv2: checkpoint_path {checkpoint_path}: no such file ({HINT})")
    config = _open_clip().get_model_config(model)
    if config is None:
        raise ValueError(
            f"reward hpsv2: model {model!r} is not an open_clip architecture (see open_clip.list_models())"
        )
    text = config.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or "siglip" in model.lower():
        raise ValueError(
            f"reward hpsv2: model {model!r} takes its text tower or tokenizer from the Hugging Face hub; "
            "use one with open_clip's own tokenizer (HPS: ViT-H-14)"
        )


@functools.lru_cache(maxsize=2)
def load_hps(checkpoint_path: str, model: str = "ViT-H-14"):
    """(open_clip model in eval mode without gradients, its tokenizer): the architecture from
    open_clip's bundled config, the weights from the local ``checkpoint_path`` only."""
    open_clip = _open_clip()
    # an absolute file path as ``pretrained`` (never a tag open_clip would download): open_clip's
    # load_checkpoint, strict, with torch.load(weights_only=True)
    try:
        net = open_clip.create_model(model, pretrained=str(Path(checkpoint_path).resolve()), device="cpu")
    except Exception as err:  # noqa: BLE001  (a wrong file fails in many ways)
        problem = _one_line(err)
        raise ValueError(f"checkpoint_path {checkpoint_path}: cannot load it into {model} ({problem})") from None
    return net.eval().requires_grad_(False), open_clip.get_tokenizer(model)


def _preload(checkpoint_path: str = "", model: str = "ViT-H-14"):
    try:
        return load_hps(checkpoint_path, model)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith("reward hpsv2") else f"reward hpsv2: {message}") from None


def hps_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """hpsv2's evaluation transform on (B, 3, H, W) floats in [0, 1]: the longer side resized
    to ``size`` (bicubic, antialiased), the rest zero-padded around the centre, CLIP mean/std."""
    x = images.float()
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        x = F.interpolate(x, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@register_reward("hpsv2")
def hpsv2(
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    checkpoint_path: str = "",
    model: str = "ViT-H-14",
) -> torch.Tensor:
    """HPSv2: cos(image, prompt) under the HPS v2/v2.1 fine-tune of OpenCLIP ViT-H-14, from a local checkpoint."""
    net, tokenizer = _preload(checkpoint_path, model)
    net = net.to(images.device)
    size = net.visual.image_size
    pixels = hps_pixels(images.detach(), size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        image_features = net.encode_image(pixels, normalize=True)
        text_features = net.encode_text(tokenizer(list(prompts)).to(images.device), normalize=True)
    return (image_features.float() * text_features.float()).sum(dim=-1)


hpsv2.check = _check
hpsv2.preflight = _preflight
hpsv2.preload = _preload
