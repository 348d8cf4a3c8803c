"""The perceptual term of ``pixel_reconstruction``: a feature distance in a VQ tokenizer's encoder.

On the digits world the FID and IS proxies are computed on the digits classifier's features; this
distance uses another network (the digits-vq encoder, or any LlamaGen VQ folder), so a reward with it
does not optimise the features it is judged by.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F


def check_perceptual(perceptual: str, perceptual_weight: float) -> None:
    """One-line ValueError for a weight below 0 or a feature net that is neither zoo:digits-vq nor a folder."""
    if perceptual_weight < 0:
        raise ValueError(f"reward 'pixel_reconstruction': perceptual_weight must be >= 0 (got {perceptual_weight})")
    if not perceptual_weight:
        return
    if str(perceptual).startswith("zoo:"):
        from rlprox.zoo.build import DIGITS_VQS, check_spec

        try:
            check_spec(perceptual, DIGITS_VQS)
        except ValueError as err:
            raise ValueError(f"reward 'pixel_reconstruction': perceptual: {err}") from None
    elif not (Path(perceptual) / "config.json").is_file():
        raise ValueError(
            f"reward 'pixel_reconstruction': perceptual {perceptual!r} is not a VQ folder (config.json + weights) "
            "nor zoo:digits-vq"
        )


@functools.lru_cache(maxsize=2)
def vq_encoder(spec: str):
    """(encoder, image_size) of a VQ folder or zoo:digits-vq (built on first use), frozen."""
    from rlprox.models.llamagen import VQModel
    from rlprox.zoo.build import resolve_path

    vq = VQModel.from_pretrained(resolve_path(spec))
    return vq.encoder.eval().requires_grad_(False), vq.config["image_size"]


def _stage_features(encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's activations after conv_in, after each resolution stage and after its middle."""
    h = encoder.conv_in(images * 2 - 1)  # the VQ's input scale
    features = [h]
    for stage in encoder.conv_blocks:
        h = stage(h)
        features.append(h)
    for block in encoder.mid:
        h = block(h)
    return features + [h]


@torch.no_grad()
def encoder_feature_distance(spec: str, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """d(x, x₀) = Σ_l 1/(H_l W_l) Σ_{h,w} ‖f̂_l(x)_{hw} − f̂_l(x₀)_{hw}‖² (B,): LPIPS's form (Zhang et al.
    2018, eq. 1) with unit layer weights, f̂_l the encoder's layer-l activations normalised to unit length
    over channels; images in [0, 1], resized to the VQ's image size if they differ."""
    encoder, size = vq_encoder(spec)
    encoder = encoder.to(images.device)
    x, y = images.float(), reference.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False)
    distance = torch.zeros(x.shape[0], device=x.device)
    for fx, fy in zip(_stage_features(encoder, x), _stage_features(encoder, y)):
        fx, fy = F.normalize(fx, dim=1, eps=1e-10), F.normalize(fy, dim=1, eps=1e-10)
        distance = distance + ((fx - fy) ** 2).sum(1).mean(dim=(1, 2))
    return distance
