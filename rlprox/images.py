"""Image grids: one picture of many samples (run folders, TensorBoard, the zoo).

A leaf module: tensors in, a uint8 array or a PNG file out. ``caption_cells`` makes
the cells of a grid a person can read (base | tuned side by side, the prompt and the
rewards under them); ``make_grid`` lays any cells out.

Videos (N, T, 3, H, W) are grids too: ``save_image_grid`` writes a still PNG, each cell a strip of
frames (``frame_strips``), and next to it the animated grid, a GIF (Pillow), and an MP4 when
imageio-ffmpeg is installed (``save_video_grid``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) images in [0, 1] -> (B, H, W, 3) uint8 array, round(255·x) of the clamped values."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, rows: int = 0, scale: int = 0, pad: int = 1, cols: int = 0) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] -> one (H', W', 3) uint8 array, row major.

    Give ``rows`` or ``cols`` (neither: a near-square grid); missing cells stay grey.
    ``scale`` = 0 upscales small images (nearest) so a cell is at least ~64 px.
    """
    images = images.detach().float().cpu()
    n, _, h, w = images.shape
    if cols:
        rows = max(1, math.ceil(n / cols))
    rows = rows or max(1, int(math.floor(math.sqrt(n))))
    cols = max(1, math.ceil(n / rows))
    grid = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for k in range(min(n, rows * cols)):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = images[k].clamp(0, 1)
    scale = scale or max(1, 64 // max(h, w))
    if scale > 1:
        grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, rows: int = 0, scale: int = 0, cols: int = 0
) -> Path:
    """Save ``make_grid(images, rows, scale, cols=cols)`` as a PNG (written to a temp name, then renamed).
    Videos (N, T, 3, H, W): the PNG holds ``frame_strips`` of them, and the animated grid is written next to
    it (``save_video_grid``: the same name with .gif, and .mp4 with imageio-ffmpeg)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:
        save_video_grid(images, path.with_suffix(""), rows, scale, cols)
        images = frame_strips(images)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(make_grid(images, rows, scale, cols=cols)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def frame_strips(videos: torch.Tensor, frames: int = 5, pad: int = 1) -> torch.Tensor:
    """Videos (N, T, 3, H, W) -> stills (N, 3, H, k·(W + pad) − pad): each video's first and last frame and
    evenly spaced ones between, k = min(frames, T), side by side on grey."""
    n, T, c, h, w = videos.shape
    picks = torch.linspace(0, T - 1, min(frames, T)).round().long()
    strips = torch.full((n, c, h, len(picks) * (w + pad) - pad), 0.5)
    for k, t in enumerate(picks):
        strips[..., k * (w + pad) : k * (w + pad) + w] = videos[:, t].detach().float().cpu()
    return strips


def save_video_grid(
    videos: torch.Tensor, stem: str | os.PathLike, rows: int = 0, scale: int = 0, cols: int = 0, fps: int = 4
) -> list[Path]:
    """The animated grid of videos (N, T, 3, H, W): frame t is ``make_grid`` of every video's frame t. Written
    as ``stem``.gif (Pillow, looping) and, when imageio-ffmpeg is installed, ``stem``.mp4 (H.264)."""
    import importlib.util

    from PIL import Image

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    frames = [make_grid(videos[:, t], rows, scale, cols=cols) for t in range(videos.shape[1])]
    gif, tmp = stem.with_suffix(".gif"), stem.with_name(f".{stem.name}.gif.tmp")
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=1000 // fps, loop=0)
    os.replace(tmp, gif)
    written = [gif]
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio

        mp4 = stem.with_suffix(".mp4")
        even = [np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)), mode="edge") for f in frames]
        imageio.mimwrite(mp4, even, fps=fps, macro_block_size=1)  # yuv420p needs even sides
        written.append(mp4)
    return written


def grid_columns(n: int) -> int:
    """Columns of a near-square grid of ``n`` cells (wider than tall when not square)."""
    return max(1, min(n, math.ceil(math.sqrt(n))))


def caption_cells(
    columns: list[torch.Tensor], header: list[str], captions: list[list[str]], lines: int = 3
) -> torch.Tensor:
    """One readable cell per item: the ``header`` labels (e.g. "base", "tuned") over the
    item's images side by side, one image per entry of ``columns``, then its caption
    lines (prompt or class, the rewards) in PIL's default font, wrapped to the cell and
    cut or padded to ``lines`` so that every cell of every process has one size.

    columns: each (N, 3, H, W) in [0, 1]; images are resized to a side of 64..256 px
    (nearest when enlarged). captions: N lists of lines. Returns (N, 3, H', W') in
    [0, 1], to lay out with ``make_grid(cells, cols=grid_columns(N))``.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n, (h, w) = columns[0].shape[0], columns[0].shape[-2:]
    side = min(max(h, w, 64), 256)
    pad, line_h = 3, font.getbbox("Ag")[3] + 3
    width = len(columns) * (side + pad) + pad
    height = line_h + side + pad + lines * line_h + pad
    cells = []
    for i in range(n):
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        for j, (images, label) in enumerate(zip(columns, header)):
            x = pad + j * (side + pad)
            draw.text((x + max(0, (side - draw.textlength(label, font=font)) / 2), 1), label, fill="black", font=font)
            array = (images[i].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
            resample = Image.NEAREST if side >= max(h, w) else Image.BILINEAR
            canvas.paste(Image.fromarray(array.numpy()).resize((side, side), resample), (x, line_h))
        text = [piece for line in captions[i] for piece in _wrap(line, font, width - 2 * pad)]
        if len(text) > lines:
            text = text[: lines - 1] + [_fit(" ".join(text[lines - 1 :]), font, width - 2 * pad)]
        for k, line in enumerate(text):
            draw.text((pad, line_h + side + pad + k * line_h), line, fill="black", font=font)
        cells.append(torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(cells)


def _wrap(line: str, font, width: int) -> list[str]:
    out, current = [], ""
    for word in line.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            out.append(current)
            current = word
        else:
            current = trial
    return [_fit(piece, font, width) for piece in out + [current]]


def _fit(line: str, font, width: int) -> str:
    """``line`` cut to ``width`` pixels, ending in "..." when cut."""
    if font.getlength(line) <= width:
        return line
    while line and font.getlength(line + "...") > width:
        line = line[:-1]
    return line + "..."
