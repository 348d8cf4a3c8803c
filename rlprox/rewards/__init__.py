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

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable

import torch

RewardFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict]"]
_REGISTRY: dict[str, RewardFn] = {}

__all__ = ["register_reward", "get_reward", "list_rewards", "digits_alignment", "brightness"]


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``get_reward(name)``."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_rewards() -> dict[str, str]:
    """{name: one-line description} of the registered rewards."""
    return {name: _summary(fn) for name, fn in sorted(_REGISTRY.items())}


def _summary(fn: RewardFn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.splitlines()[0] if doc else ""


def _load_plugin(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def get_reward(name: str, **kwargs) -> RewardFn:
    """A reward callable by registered name or ``"module:function"``, with ``kwargs`` bound.

    Raises a one-line ``ValueError`` for unknown names (with a did-you-mean) and for
    keyword arguments the reward does not accept.
    """
    if ":" in name:
        fn = _load_plugin(name)
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown reward {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}, "
            "or give 'module:function'"
        )
    if not kwargs:
        return fn
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if not takes_any and (key not in params or key in ("images", "prompts", "metadata")):
            accepted = [k for k in params if k not in ("images", "prompts", "metadata")]
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"reward {name!r} has no option {key!r}{hint}; options: {', '.join(accepted) or 'none'}"
            )
    return functools.partial(fn, **kwargs)


# ----------------------------------------------------------------------------- built-ins
@register_reward("brightness")
def brightness(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean pixel value of each image (a trivial reward for tests and smoke runs)."""
    return images.float().mean(dim=(1, 2, 3))


@functools.lru_cache(maxsize=4)
def _classifier(spec: str, seed: int):
    from rlprox.zoo.build import resolve
    from rlprox.zoo.classifier import DigitsClassifier

    path = resolve(spec, seed=seed) if spec.startswith("zoo:") else spec
    return DigitsClassifier.from_pretrained(path)


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
