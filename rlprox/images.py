"""Image grids: one picture of many samples (run folders, TensorBoard, the zoo).

A leaf module: tensors in, a uint8 array or a PNG file out.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    """Save ``make_grid(images, rows, scale, cols=cols)`` as a PNG (written to a temp name, then renamed)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(make_grid(images, rows, scale, cols=cols)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
