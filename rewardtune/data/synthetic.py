"""Synthetic preference sets in the published Pick-High layout: one writer for any drawn world, and the
coloured-shapes world of ``rewardtune data synthetic``.

A world passes ``draw(rng, n, split) -> triplets``; each triplet is a dict with ``easy_prompt``,
``refine_prompt``, ``images`` (I1 loser, I2 winner, I3 of the refined prompt; (H, W, 3) uint8 or float in
[0, 1]) and the ICT labels ``E1, E2, R1, R2``. The writer owns the rest: one seed per split, the image
folders, the tables and their formats. The demo world's preference set (``rewardtune.demo.data``) is the
other caller.

Coloured shapes: each triplet draws one shape. Prompts: ``a red circle`` (easy) and ``a red circle on a
blue background`` (refined). Image quality rises visibly along the triplet: I1 (loser) is faded and very
noisy, I2 (winner) mildly noisy, I3 clean and on the refined prompt's background. So an image-only
preference model can learn I3 > I2 > I1, and a text-image model can learn that I3 holds more of the
refined prompt.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .triplets import COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, PROMPT_COLUMNS

FORMATS = ("parquet", "jsonl", "pickle")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
# File names of I1, I2 and I3 of triplet ``i`` under pick_easy_img/<split>/ (I1, I2) and pick_refine_img/<split>/ (I3).
IMAGE_NAMES = ("{i:05d}_0.png", "{i:05d}_1.png", "{i:05d}.png")
IMAGE_DIRS = ("pick_easy_img", "pick_easy_img", "pick_refine_img")


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The split's random generator: it depends on the split's name only, so each split can be written alone."""
    offset = SPLIT_SEEDS[split] if split in SPLIT_SEEDS else zlib.crc32(split.encode())
    return np.random.default_rng([seed, offset])


def write_synthetic_set(
    root,
    draw,
    sizes: dict[str, int],
    seed: int = 0,
    formats=("parquet",),
    image_names: tuple[str, str, str] = IMAGE_NAMES,
) -> dict:
    """Write ``draw(split_rng(seed, split), n, split)`` for each ``split: n`` of ``sizes`` under ``root``;
    returns each split's table (image paths relative to ``root``)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {
        split: write_triplets(root, split, draw(split_rng(seed, split), n, split), formats, image_names)
        for split, n in sizes.items()
    }


def write_triplets(
    root, split: str, triplets: list[dict], formats=("parquet",), image_names: tuple[str, str, str] = IMAGE_NAMES
):
    """One split's PNGs and tables: ``Pick-High/<split>.pkl`` with bare image names, as published, and
    ``<split>.parquet`` / ``.jsonl`` with paths relative to ``root``. Returns the relative table."""
    import pandas as pd

    root = Path(root)
    dirs = [root / d / split for d in IMAGE_DIRS]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, t in enumerate(triplets):
        names = [template.format(i=i) for template in image_names]
        for im, d, name in zip(t["images"], dirs, names):
            Image.fromarray(_uint8(im)).save(d / name)
        rows.append({**{c: t[c] for c in PROMPT_COLUMNS + LABEL_COLUMNS}, **dict(zip(IMAGE_COLUMNS, names))})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if "pickle" in formats:
        (root / "Pick-High").mkdir(exist_ok=True)
        _atomic(root / "Pick-High" / f"{split}.pkl", frame.to_pickle)
    rel = frame.copy()
    for col, d in zip(IMAGE_COLUMNS, IMAGE_DIRS):
        rel[col] = [f"{d}/{split}/{name}" for name in rel[col]]
    if "parquet" in formats:
        _atomic(root / f"{split}.parquet", lambda path: rel.to_parquet(path, index=False))
    if "jsonl" in formats:
        _atomic(root / f"{split}.jsonl", lambda path: rel.to_json(path, orient="records", lines=True))
    return rel


def _uint8(image: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; floats in [0, 1] rounded to 0..255."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``, so a killed run leaves no half-written table."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the coloured-shapes world

SHAPES = ["square", "circle", "triangle", "cross"]
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}
BACKGROUNDS = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "purple": (0.55, 0.2, 0.7),
    "orange": (1.0, 0.55, 0.1),
}
WORDS = ["a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS]
GREY = 0.5
NOISE = (0.35, 0.12, 0.0)  # noise std of I1, I2, I3
FADE = (0.5, 0.15, 0.0)  # how far I1, I2, I3 are blended towards grey


def shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) mask of ``shape`` at a jittered centre and scale."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    r = size * rng.uniform(0.22, 0.32)
    dx, dy = np.abs(x - cx), np.abs(y - cy)
    if shape == "square":
        return (dx < r) & (dy < r)
    if shape == "circle":
        return dx**2 + dy**2 < r**2
    if shape == "triangle":
        return (y > cy - r) & (y < cy + r) & (dx < (y - (cy - r)) / 2)
    if shape == "cross":
        return ((dx < r / 3) & (dy < r)) | ((dy < r / 3) & (dx < r))
    raise ValueError(f"unknown shape {shape!r}")


def render(mask: np.ndarray, color, background, noise: float, fade: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3): ``color`` on ``background``, faded towards grey, plus Gaussian noise."""
    img = np.where(mask[..., None], np.asarray(color, np.float32), np.asarray(background, np.float32))
    img = (1 - fade) * img + fade * GREY
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_triplet(rng: np.random.Generator, size: int) -> dict:
    """One row: prompts, three images (uint8 arrays) and ICT labels in [0, 1]."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    mask = shape_mask(shape, size, rng)
    backs = ((GREY,) * 3, (GREY,) * 3, BACKGROUNDS[bg])
    images = [render(mask, COLORS[color], b, n, f, rng) for b, n, f in zip(backs, NOISE, FADE)]
    e2 = float(rng.uniform(0.55, 0.85))
    e1 = e2 * float(rng.uniform(0.6, 0.95))
    sim = float(rng.uniform(0.6, 0.9))  # stands in for CLIP(P_easy, P_refined)
    return {
        "easy_prompt": f"a {color} {shape}",
        "refine_prompt": f"a {color} {shape} on a {bg} background",
        "images": images,
        "E1": e1,
        "E2": e2,
        "R1": e1 * sim,
        "R2": e2 * sim,
    }


def make_pick_high(
    root, splits: dict[str, int] | None = None, size: int = 32, seed: int = 0, formats: tuple[str, ...] = ("pickle",)
) -> dict[str, int]:
    """Write a coloured-shapes set under ``root``: ``formats`` among "pickle" (``Pick-High/<split>.pkl``),
    "parquet" and "jsonl" (``<split>.parquet``/``.jsonl``); images always under ``pick_easy_img/<split>/``
    and ``pick_refine_img/<split>/``. Returns rows per split."""
    splits = splits or {"train": 64, "val": 16, "test": 32}
    tables = write_synthetic_set(
        root, lambda rng, n, split: [make_triplet(rng, size) for _ in range(n)], splits, seed, formats
    )
    return {split: len(table) for split, table in tables.items()}
