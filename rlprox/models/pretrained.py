"""Saving and loading the zoo's plain-torch models through huggingface_hub's
``PyTorchModelHubMixin``.

A model directory holds ``config.json`` (the constructor's keyword arguments plus
``model_type``) and ``model.safetensors``, the layout diffusers and transformers use.
Loading takes a local path only (resolving ``zoo:NAME`` specs is
``rlprox.zoo.build.resolve_path``'s job), is strict about the weights, and refuses a
directory that holds another model type with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

CONFIG_NAME = "config.json"


class ZooModule(nn.Module, PyTorchModelHubMixin):
    """Base of the zoo models. The subclass keeps its constructor's keywords in
    ``self.config`` (a JSON-able dict)."""

    config: dict

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        super().save_pretrained(str(path), config={"model_type": type(self).__name__, **self.config}, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu", **kwargs):
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{cls.__name__}: no {CONFIG_NAME} in {path}")
        model_type = json.loads((path / CONFIG_NAME).read_text()).get("model_type", cls.__name__)
        if model_type != cls.__name__:
            raise ValueError(f"{path} holds a {model_type}, not a {cls.__name__}")
        with contextlib.redirect_stdout(io.StringIO()):  # the mixin prints where it loads from
            model = super().from_pretrained(str(path), map_location=str(map_location), strict=True, **kwargs)
        return model.eval()
