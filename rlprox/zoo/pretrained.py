"""``save_pretrained`` / ``from_pretrained`` for the zoo's plain-torch models.

A model directory holds ``config.json`` (the constructor's keyword arguments) and
``model.safetensors`` (the state dict), the layout diffusers and transformers use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    """Mixin for an ``nn.Module`` whose ``__init__`` takes only JSON-able keywords.

    The subclass stores those keywords in ``self.config`` (a dict).
    """

    config: dict

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"model_type": type(self).__name__, **self.config}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu"):
        """Load from a local directory, or from a ``zoo:NAME`` spec (built if missing)."""
        from safetensors.torch import load_file

        if str(path).startswith("zoo:"):
            from rlprox.zoo.build import resolve

            path = resolve(str(path))
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{cls.__name__}: no {CONFIG_NAME} in {path}")
        config = json.loads((path / CONFIG_NAME).read_text())
        model_type = config.pop("model_type", cls.__name__)
        if model_type != cls.__name__:
            raise ValueError(f"{path} holds a {model_type}, not a {cls.__name__}")
        model: nn.Module = cls(**config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device=str(map_location)))
        return model.eval()
