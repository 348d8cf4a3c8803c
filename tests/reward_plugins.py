"""Reward plugins for the tests: good ones and broken ones ("tests.reward_plugins:NAME")."""

import torch

CALLS = {"n": 0}


def raises_on_second_call(images, prompts, metadata):
    CALLS["n"] += 1
    if CALLS["n"] >= 2:
        raise RuntimeError("scorer crashed\nwith a long traceback")
    return images.mean(dim=(1, 2, 3))


def wrong_shape(images, prompts, metadata):
    return images.mean(dim=(2, 3))  # (B, 3)


def all_nan(images, prompts, metadata):
    return torch.full((len(images),), float("nan"))


def some_nan(images, prompts, metadata):
    r = images.mean(dim=(1, 2, 3)).clone()
    r[0] = float("nan")
    return r, {"flag": 1.0}


def constant(images, prompts, metadata):
    return torch.full((len(images),), 0.1)


def on_meta(images, prompts, metadata):
    return torch.zeros(len(images), device="meta")  # shapes right, holds no values
