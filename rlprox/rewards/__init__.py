"""Reward registry and built-in rewards.

A reward is ``fn(images, prompts, metadata) -> Tensor[B]`` or ``(Tensor[B], dict)``:

- ``images``: (B, 3, H, W) float in [0, 1]
- ``prompts``: B strings
- ``metadata``: B dicts (may be empty)

Register with ``@register_reward("name")`` (the first docstring line is the description
``list_rewards`` shows); look up with ``get_reward("name", **kwargs)`` or
``get_reward("package.module:function", **kwargs)``. Keyword arguments are bound to the
function (checked against its signature) and passed on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from rlprox.errors import RegistryError
from rlprox.registry import Registry

RewardFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict]"]
REWARDS = Registry("reward")
CALL_ARGS = ("images", "prompts", "metadata")

__all__ = ["REWARDS", "register_reward", "get_reward", "list_rewards", "digits_alignment", "brightness"]


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``get_reward(name)``."""
    return REWARDS.register(name)


def list_rewards() -> dict[str, str]:
    """{name: one-line description} of the registered rewards."""
    return REWARDS.describe()


def get_reward(name: str, **kwargs) -> RewardFn:
    """A reward callable by registered name or ``"module:function"``, with ``kwargs`` bound.

    Raises a one-line ``ValueError`` for unknown names (with a did-you-mean) and for
    keyword arguments the reward does not accept.
    """
    try:
        return REWARDS.bind(name, kwargs, reserved=CALL_ARGS)
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
            targets.append((int(meta["digit"]),
                            COLOUR_NAMES.index(colour) if isinstance(colour, str) else int(colour)))
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
