"""A small synthetic preference set in the published Pick-High layout, for tests, demos and trying the
pipeline in minutes on a CPU.

Each triplet draws one coloured shape. Prompts: ``a red circle`` (easy) and ``a red circle on a blue
background`` (refined). Image quality rises visibly along the triplet: I1 (loser) is faded and very
noisy, I2 (winner) mildly noisy, I3 clean and on the refined prompt's background. So an image-only
preference model can learn I3 > I2 > I1, and a text-image model can learn that I3 holds more of the
refined prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ["square", "circle", "triangle", "cross"]
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "purple": (0.55, 0.2, 0.7), "orange": (1.0, 0.55, 0.1)}
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
    return {"easy_prompt": f"a {color} {shape}", "refine_prompt": f"a {color} {shape} on a {bg} background",
            "images": images, "E1": e1, "E2": e2, "R1": e1 * sim, "R2": e2 * sim}


def make_pick_high(root, splits: dict[str, int] | None = None, size: int = 32, seed: int = 0,
                   formats: tuple[str, ...] = ("pickle",)) -> dict[str, int]:
    """Write a synthetic set under ``root``: ``formats`` among "pickle" (``Pick-High/<split>.pkl``),
    "parquet" and "jsonl" (``<split>.parquet``/``.jsonl``); images always under ``pick_easy_img/<split>/``
    and ``pick_refine_img/<split>/``. Returns rows per split."""
    import pandas as pd
    from PIL import Image

    root = Path(root)
    splits = splits or {"train": 64, "val": 16, "test": 32}
    for k, (split, n) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, k])
        easy, refine = root / "pick_easy_img" / split, root / "pick_refine_img" / split
        easy.mkdir(parents=True, exist_ok=True)
        refine.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            t = make_triplet(rng, size)
            names = (f"{i:05d}_0.png", f"{i:05d}_1.png", f"{i:05d}.png")
            for img, d, name in zip(t.pop("images"), (easy, easy, refine), names):
                Image.fromarray(img).save(d / name)
            rows.append({**t, "easy_image_0": names[0], "easy_image_1": names[1], "refine_image": names[2]})
        frame = pd.DataFrame(rows)
        if "pickle" in formats:
            (root / "Pick-High").mkdir(exist_ok=True)
            frame.to_pickle(root / "Pick-High" / f"{split}.pkl")
        rel = frame.copy()
        for col, d in (("easy_image_0", "pick_easy_img"), ("easy_image_1", "pick_easy_img"), ("refine_image", "pick_refine_img")):
            rel[col] = [f"{d}/{split}/{name}" for name in rel[col]]
        if "parquet" in formats:
            rel.to_parquet(root / f"{split}.parquet", index=False)
        if "jsonl" in formats:
            rel.to_json(root / f"{split}.jsonl", orient="records", lines=True)
    return dict(splits)
