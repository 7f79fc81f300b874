"""Image grids as PNG files (written atomically): samples at fixed seeds, teacher beside student."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .data.images import to_uint8
from .io import atomic_write_bytes

Tensor = torch.Tensor


def image_grid(x: Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> one uint8 image ``[rows*(H+pad)+pad, nrow*(W+pad)+pad, C]``, row-major."""
    u8 = to_uint8(x)
    n, c, h, w = u8.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = (
            u8[i].transpose(1, 2, 0))
    return grid


def save_grid(path: str | Path, x: Tensor, nrow: int = 8, scale: int = 2) -> Path:
    """Write ``x`` as a PNG grid (pixels enlarged ``scale`` times for viewing)."""
    from PIL import Image

    grid = image_grid(x, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
