"""Video rewards: ``fn(videos, prompts, metadata)`` with videos (B, T, 3, H, W) in [0, 1],
registered with ``media="video"``.

- ``temporal_consistency``: the mean SSIM of consecutive frames (a smoothness example);
- ``digits_video_alignment``: the moving-digits world's reward (digits-wan): the digit and colour
  the prompt names, frame by frame, and the direction of the digit's track.
"""

from __future__ import annotations

import torch

from rlprox.rewards import _check_classifier_name, _check_classifier_path, _classifier, register_reward, ssim


@register_reward("temporal_consistency", media="video")
def temporal_consistency(videos: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Mean SSIM of consecutive frames, 1/(T−1)·Σ_t SSIM(x_t, x_t+1): 1 for a still clip."""
    B, T = videos.shape[:2]
    if T < 2:
        return torch.ones(B, device=videos.device)
    pairs = ssim(videos[:, :-1].flatten(0, 1), videos[:, 1:].flatten(0, 1))  # (B·(T−1),)
    return pairs.view(B, T - 1).mean(1)


def digit_track(videos: torch.Tensor) -> torch.Tensor:
    """The digit's centre in each frame, (B, T, 2) as (x, y) pixels: the centroid of the brightness above
    the dark background, m = max_c(x) − background, clamped at 0 (the frame's centre when m is all 0)."""
    from rlprox.zoo.data import BACKGROUND

    mass = (videos.float().amax(dim=2) - BACKGROUND).clamp(min=0)  # (B, T, H, W)
    H, W = mass.shape[-2:]
    ys = torch.arange(H, dtype=torch.float32, device=mass.device).view(H, 1)
    xs = torch.arange(W, dtype=torch.float32, device=mass.device).view(1, W)
    total = mass.sum(dim=(-2, -1))
    empty = total <= 1e-6
    total = total.clamp(min=1e-6)
    x = torch.where(empty, torch.tensor((W - 1) / 2), (mass * xs).sum(dim=(-2, -1)) / total)
    y = torch.where(empty, torch.tensor((H - 1) / 2), (mass * ys).sum(dim=(-2, -1)) / total)
    return torch.stack([x, y], dim=-1)


def crop_digits(videos: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each frame's window of the digit's size (half the clip's side, as rendered) around its centre, kept
    inside the frame: (B·T, 3, s, s)."""
    B, T, C, H, W = videos.shape
    side = max(1, min(H, W) // 2)
    frames = videos.flatten(0, 1)
    corners = (centres.flatten(0, 1) - (side - 1) / 2).round().long()
    x0 = corners[:, 0].clamp(0, W - side)
    y0 = corners[:, 1].clamp(0, H - side)
    rows = (y0[:, None] + torch.arange(side, device=videos.device)).view(-1, 1, side, 1).expand(-1, C, side, W)
    band = frames.gather(2, rows)  # (B·T, C, side, W)
    cols = (x0[:, None] + torch.arange(side, device=videos.device)).view(-1, 1, 1, side).expand(-1, C, side, side)
    return band.gather(3, cols)


@register_reward("digits_video_alignment", media="video")
def digits_video_alignment(
    videos: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    classifier: str = "zoo:digits-classifier",
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """½·(appearance + motion) of the prompted moving digit, in [0, 1] (digits-wan).

    appearance = 1/T·Σ_t P(digit)·P(colour) of the digits-classifier on frame t's window around the digit's
    centroid; motion = clamp(D·u / L, 0, 1), D the centroid's displacement over the clip (the least-squares
    slope of its track × (T − 1)), u the prompted direction's unit vector, L the rendered travel (half the
    side). The targets come from ``metadata[i]`` ("digit", "colour", "direction") when present, else from the
    prompt ("a red three moving left"). Stats: digit_acc, colour_acc (per frame), direction_acc (the direction
    of largest D·u), motion."""
    from rlprox.zoo.data import COLOUR_NAMES, DIRECTION_NAMES, DIRECTIONS, parse_motion_prompt

    B, T, _, H, W = videos.shape
    targets = []
    for prompt, meta in zip(prompts, metadata or [{}] * len(prompts)):
        if meta and {"digit", "colour", "direction"} <= set(meta):
            colour, direction = meta["colour"], meta["direction"]
            targets.append(
                (
                    int(meta["digit"]),
                    COLOUR_NAMES.index(colour) if isinstance(colour, str) else int(colour),
                    DIRECTION_NAMES.index(direction) if isinstance(direction, str) else int(direction),
                )
            )
        else:
            targets.append(parse_motion_prompt(prompt))
    digits, colours, directions = (torch.tensor(column) for column in zip(*targets))
    videos = videos.float()
    track = digit_track(videos).cpu()  # (B, T, 2)
    model = _classifier(classifier, seed).to(videos.device)
    p_digit, p_colour = (
        p.cpu().view(B, T, -1) for p in model.predict_proba(crop_digits(videos, track.to(videos.device)))
    )
    appearance = (
        p_digit.gather(2, digits.view(B, 1, 1).expand(B, T, 1))[..., 0]
        * p_colour.gather(2, colours.view(B, 1, 1).expand(B, T, 1))[..., 0]
    ).mean(1)
    t = torch.arange(T, dtype=torch.float32) - (T - 1) / 2
    slope = (t.view(1, T, 1) * track).sum(1) / (t**2).sum().clamp(min=1e-6)  # (B, 2) pixels per frame
    displacement = slope * (T - 1)
    units = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)  # (4, 2)
    along = displacement @ units.T  # (B, 4): D·u of every direction
    travel = min(H, W) / 2
    motion = (along.gather(1, directions[:, None])[:, 0] / travel).clamp(0, 1)
    reward = (appearance + motion) / 2
    stats = {
        "digit_acc": (p_digit.argmax(-1) == digits[:, None]).float().mean().item(),
        "colour_acc": (p_colour.argmax(-1) == colours[:, None]).float().mean().item(),
        "direction_acc": (along.argmax(-1) == directions).float().mean().item(),
        "motion": motion.mean().item(),
    }
    return reward.to(videos.device), stats


digits_video_alignment.check = _check_classifier_name
digits_video_alignment.preflight = _check_classifier_path
digits_video_alignment.preload = lambda classifier="zoo:digits-classifier", seed=0: _classifier(classifier, seed)
