"""Image files in and out: float tensors in [0,1], clear errors for missing or corrupt files."""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

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


# Pillow refuses images above twice its MAX_IMAGE_PIXELS as possible decompression bombs; so do we, with a line
# that says what to do (and below that, without Pillow's warning).
MAX_PIXELS = 2 * 89_478_485
# An image whose shorter side is more than twice this is reduced on load by a whole factor that keeps the shorter
# side at this or more: every reward looks at 224-448 px, so a 9000 x 6000 photo need not be held in full.
KEEP_SIDE = 2048


def image_size_problem(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (width, height, from its header) is refused, or None."""
    w, h = size
    if w * h > MAX_PIXELS:
        return _too_large(f"is {w} x {h} ({w * h / 1e6:.0f} million pixels)")
    return None


def _too_large(what: str) -> str:
    return (
        f"{what}, over the limit of {MAX_PIXELS / 1e6:.0f} million pixels (a possible decompression bomb); "
        f"downscale it, e.g. to 4096 px on its longer side"
    )


@contextlib.contextmanager
def opened(path: Path):
    """``Image.open(path)`` with its size checked from the header alone (Pillow's bomb check and ours, one line
    either way) and without Pillow's warning for images between its two thresholds."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"has {int(pixels.group(1)) / 1e6:.0f} million pixels" if pixels else "is too large"
        raise UserError(f"image '{path}' {_too_large(what)}") from None
    with im:
        problem = image_size_problem(im.size)
        if problem:
            raise UserError(f"image '{path}' {problem}")
        yield im


def open_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as 8-bit RGB (HWC), its size checked from the header before any pixel is decoded, and a
    large one reduced (``KEEP_SIDE``); one-line ``UserError`` for a missing, corrupt or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image '{path}' does not exist; check the path")
    try:
        with opened(path) as im:
            factor = min(im.size) // KEEP_SIDE
            if factor > 1 and im.format == "JPEG":
                im.draft("RGB", (im.width // factor, im.height // factor))  # decoded at a fraction of the size
            im.load()
            arr = _rgb8(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"image '{path}' is unreadable or corrupt ({type(exc).__name__}); replace or remove it"
        ) from None
    factor = min(arr.shape[:2]) // KEEP_SIDE
    if factor > 1:
        arr = np.asarray(Image.fromarray(arr).reduce(factor))
    return arr


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """(3,H,W) float32 in [0,1], from an image file of any mode (see ``_rgb8``, ``open_image``)."""
    arr = open_image(path)
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


def with_caption(grid: torch.Tensor, lines: list[str], pad: int = 2) -> torch.Tensor:
    """``grid`` (3,H,W) in [0,1] with ``lines`` of black text on white below it (widened to fit the text)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    line_h = max((b[3] for b in boxes), default=0) + pad
    width = max([grid.shape[2], *[b[2] + 2 * pad for b in boxes]])
    canvas = Image.new("RGB", (width, grid.shape[1] + line_h * len(lines) + pad), "white")
    canvas.paste(Image.fromarray(to_uint8(grid)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, grid.shape[1] + i * line_h), line, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
