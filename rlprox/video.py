"""Videos of a policy's episodes on the recipe's gymnasium env (``rlprox eval --video``).

Each episode is rendered with ``render_mode="rgb_array"`` and written with imageio:
MP4 when imageio-ffmpeg is installed, else an animated GIF (``pip install
'rlprox[video]'`` brings both, and pygame for the classic-control envs' renderer).
Episode i resets from ``seed + i``: with the evaluation seed of ``rlprox.gymenv.eval_seed``
these are the episodes the first evaluation envs run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from rlprox.gymenv import EnvConfig, make_env

DEFAULT_FPS = 30


class VideoError(ValueError):
    """The env cannot be filmed (no ``rgb_array`` rendering)."""


def has_ffmpeg() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def record_episodes(
    cfg: EnvConfig, act, episodes: int, seed: int, out_dir: str | Path, prefix: str = "episode", on_reset=None
) -> list[tuple[Path, float]]:
    """Run ``episodes`` episodes of ``act(obs) -> env action`` (one raw observation in,
    one action out; ``on_reset()``, when given, is called before each episode, e.g. to
    clear a recurrent policy's state) and write one video per episode to ``out_dir``;
    returns (path, episode return) per episode. The frames are the env's own renders
    (for Atari the full-size game, not the 84×84 observations)."""
    import imageio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "mp4" if has_ffmpeg() else "gif"
    written = []
    for i in range(episodes):
        env = _render_env(cfg)
        if on_reset is not None:
            on_reset()
        fps = int(env.metadata.get("render_fps") or DEFAULT_FPS)
        obs, _ = env.reset(seed=seed + i)
        frames, total, done = [env.render()], 0.0, False
        if not isinstance(frames[0], np.ndarray):
            raise VideoError(f"env {cfg.id} renders no rgb_array frames (render() gave {type(frames[0]).__name__})")
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            frames.append(env.render())
            total += float(reward)
            done = terminated or truncated
        env.close()
        path = out / f"{prefix}-{i:03d}.{suffix}"
        frames = [np.asarray(f, np.uint8) for f in frames]
        if suffix == "mp4":  # yuv420p needs even sides: pad rather than let ffmpeg rescale
            frames = [np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)), mode="edge") for f in frames]
            imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
        else:
            imageio.mimwrite(path, frames, duration=1000.0 / fps, loop=0)
        written.append((path, total))
    return written


def _render_env(cfg: EnvConfig):
    try:
        return make_env(cfg, render_mode="rgb_array")
    except TypeError as err:
        if "render_mode" not in str(err):
            raise
        raise VideoError(f"env {cfg.id} takes no render_mode: it cannot render frames") from None
