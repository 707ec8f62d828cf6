"""Image files in and out: float tensors in [0,1], clear errors for missing or corrupt files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .sources import atomic_write_bytes


def _rgb8(im) -> np.ndarray:
    """Any PIL mode as 8-bit RGB. Pillow's own ``convert("RGB")`` clips 16/32-bit greyscale to 255 (an
    ordinary 16-bit PNG comes out almost white), so those are scaled from their full range instead; float
    images are taken as [0,1]. Palette, CMYK and greyscale go through Pillow; alpha is dropped, as CLIP's
    image processors drop it. (16-bit RGB PNGs already open as 8-bit RGB.)"""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" else 65535.0
        grey = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns on palette transparency straight to RGB
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """(3,H,W) float32 in [0,1], from an image file of any mode (see ``_rgb8``)."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            arr = _rgb8(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"image '{path}' is unreadable or corrupt ({type(exc).__name__}); replace or remove it"
        ) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) or (3,H,W) floats in [0,1] -> uint8 HWC array(s)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.permute(1, 2, 0).numpy()


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write an image file atomically, its format from the suffix (PNG if unknown); a failed write (full disk,
    read-only path) is a one-line ``UserError``."""
    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    atomic_write_bytes(path, buf.getvalue(), "image")


def make_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """(B,3,H,W) -> (3, rows*H, cols*W) with white padding."""
    b, c, h, w = images.shape
    ncol = ncol or min(b, 8)
    nrow = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            images[i].detach().float().cpu()
        )
    return grid
