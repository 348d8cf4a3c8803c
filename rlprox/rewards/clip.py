"""CLIP image-text rewards from a local CLIP model: ``clip_score`` and ``pickscore``.

Both score image x_i against its prompt c_i through the cosine of the projected CLIP
embeddings, cos_i = ⟨E_I(x_i), E_T(c_i)⟩ / (‖E_I(x_i)‖·‖E_T(c_i)‖):

- ``clip_score`` = max(100·cos_i, 0): CLIP-S = w·max(cos, 0) (Hessel et al. 2021, eq. 1)
  at torchmetrics' scale w = 100;
- ``pickscore`` = exp(τ)·cos_i, τ the model's learned ``logit_scale``: the image-text
  logit by which PickScore (Kirstain et al. 2023) ranks images, given its fine-tuned
  CLIP-H weights.

The model (``CLIPModel``) and its processor (tokenizer + image processor) load from
local folders only, once, when the reward is built: ``model_path``, and
``processor_path`` when the processor is saved elsewhere (PickScore_v1's weights use
the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Images go through the
processor as floats in [0, 1] (no 8-bit rounding); prompts are padded and cut at the
tokenizer's ``model_max_length``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rlprox.rewards import register_reward

__all__ = ["clip_score", "pickscore", "clip_cosine", "load_clip"]

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _missing_model(folder: Path) -> str:
    """What keeps ``folder`` from being a saved CLIPModel ("" when nothing)."""
    if not folder.is_dir():
        return "not a folder"
    if not (folder / "config.json").is_file():
        return "config.json missing"
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return "config.json unreadable"
    if model_type != "clip":
        return f"config.json is a {model_type!r} model, not 'clip'"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model.safetensors or pytorch_model.bin"
    return ""


def _missing_processor(folder: Path) -> str:
    """What keeps ``folder`` from being a saved CLIPProcessor ("" when nothing)."""
    if not folder.is_dir():
        return "not a folder"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return "tokenizer.json or vocab.json missing"
    if not any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        return "preprocessor_config.json missing"
    return ""


def _checker(reward: str, files: bool):
    def check(model_path: str = "", processor_path: str = "") -> None:
        for key, value in (("model_path", model_path), ("processor_path", processor_path)):
            if not isinstance(value, str) or (key == "model_path" and not value):
                raise ValueError(f"reward {reward}: {key} must be a local CLIP folder (got {value!r})")
        if not files:
            return
        problem = _missing_model(Path(model_path))
        if problem:
            raise ValueError(f"reward {reward}: model_path {model_path}: no CLIP model there ({problem})")
        key, folder = ("processor_path", processor_path) if processor_path else ("model_path", model_path)
        problem = _missing_processor(Path(folder))
        if problem:
            raise ValueError(f"reward {reward}: {key} {folder}: no CLIP processor there ({problem})")

    return check


def _from_pretrained(cls, key: str, path: str):
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001  (a broken folder fails in many ways)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{key} {path}: cannot load a {cls.__name__} ({first})") from None


@functools.lru_cache(maxsize=2)
def load_clip(model_path: str, processor_path: str = ""):
    """(CLIPModel in eval mode without gradients, CLIPProcessor), from local folders only."""
    from transformers import CLIPModel, CLIPProcessor

    model = _from_pretrained(CLIPModel, "model_path", model_path).eval().requires_grad_(False)
    if processor_path:
        return model, _from_pretrained(CLIPProcessor, "processor_path", processor_path)
    return model, _from_pretrained(CLIPProcessor, "model_path", model_path)


def _loader(reward: str):
    def preload(model_path: str = "", processor_path: str = ""):
        try:
            return load_clip(model_path, processor_path)
        except ValueError as err:
            raise ValueError(f"reward {reward}: {err}") from None

    return preload


def clip_cosine(images: torch.Tensor, prompts: list[str], model, processor) -> torch.Tensor:
    """cos(E_I(x_i), E_T(c_i)) of each image with its own prompt, (B,) float32."""
    inputs = processor(
        text=list(prompts),
        images=list(images.detach().float().clamp(0, 1).cpu()),
        do_rescale=False,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            pixel_values=inputs["pixel_values"].to(device, model.dtype),
        )
    return F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)


@register_reward("clip_score")
def clip_score(
    images: torch.Tensor, prompts: list[str], metadata: list[dict], model_path: str = "", processor_path: str = ""
) -> torch.Tensor:
    """CLIPScore: max(100·cos(CLIP image, CLIP prompt), 0), from a local CLIP model (torchmetrics' scale)."""
    model, processor = _loader("clip_score")(model_path, processor_path)
    cos = clip_cosine(images, prompts, model.to(images.device), processor)
    return (100 * cos).clamp(min=0).to(images.device)


@register_reward("pickscore")
def pickscore(
    images: torch.Tensor, prompts: list[str], metadata: list[dict], model_path: str = "", processor_path: str = ""
) -> torch.Tensor:
    """PickScore: the CLIP image-text logit exp(logit_scale)·cos(image, prompt), from a local PickScore model."""
    model, processor = _loader("pickscore")(model_path, processor_path)
    cos = clip_cosine(images, prompts, model.to(images.device), processor)
    return (model.logit_scale.exp().float() * cos).to(images.device)


clip_score.check = _checker("clip_score", files=False)
clip_score.preflight = _checker("clip_score", files=True)
clip_score.preload = _loader("clip_score")
pickscore.check = _checker("pickscore", files=False)
pickscore.preflight = _checker("pickscore", files=True)
pickscore.preload = _loader("pickscore")
