"""A preference set of the shapes world in the Pick-High layout, labelled by the oracle.

Each triplet, as in Ba et al. (ICCV 2025): an easy prompt (shape and one or two more attributes) and a
refined prompt (every attribute, plus "highly detailed"); I1 (the loser) shows fewer of the easy
prompt's attributes than I2 (the winner); I3 shows the whole refined prompt and is the most detailed
(shaded, where the others are flat, or blurred and grainy). Labels follow the paper with the oracle's
score in place of CLIP's: C(I,P) = min(oracle(I,P)/theta, 1); E2 = C(I2, P_easy); E1 = min(C(I1, P_easy), E2);
R2 = E2 * sim(P_easy, P_refined); R1 = E1 * sim, where sim is the prompts' attribute overlap.

Optionally half the I1/I2 pairs are images of the base generator (ordered by the oracle), and a quarter
of the losers are junk (stray strokes, speckles, cuts), so that the rewards judge generated images and
do not take high-frequency junk for detail.

Written by the synthetic-set writer of ``rewardtune.data.synthetic`` (this module draws the triplets):
``<root>/<split>.parquet`` with image paths relative to ``<root>``; optionally also the published pickle
layout ``<root>/Pick-High/<split>.pkl`` (images under ``pick_easy_img/<split>/`` and ``pick_refine_img/<split>/``,
shared by both).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import SPLIT_SEEDS, write_synthetic_set
from . import world

IMAGE_NAMES = ("{i:06d}_0.png", "{i:06d}_1.png", "{i:06d}_r.png")
DETAIL_I1 = (0.6, 0.4, 0.0)  # probabilities of detail 0, 1, 2 for the loser
DETAIL_I2 = (0.25, 0.75, 0.0)  # and for the winner (never below the loser's)


def make_triplet(rng: np.random.Generator, theta: float = 1.0) -> dict:
    """One triplet: scenes (I1, I2, I3), prompts and the ICT labels E1, E2, R1, R2."""
    refined = world.random_scene(rng, detail=2)
    others = [a for a in world.ATTRIBUTES if a != "shape"]
    easy_attrs = ["shape"] + list(rng.choice(others, size=int(rng.integers(1, 3)), replace=False))
    full = refined.attributes()
    easy_prompt = world.make_prompt({a: full[a] for a in easy_attrs})
    refine_prompt = world.make_prompt(full, detailed=True)
    n_wrong2 = int(rng.integers(0, len(easy_attrs)))
    n_wrong1 = int(rng.integers(n_wrong2 + 1, len(easy_attrs) + 1))
    d1 = int(rng.choice(3, p=DETAIL_I1))
    d2 = max(d1, int(rng.choice(3, p=DETAIL_I2)))
    i1 = _variant(rng, refined, easy_attrs, n_wrong1, d1)
    i2 = _variant(rng, refined, easy_attrs, n_wrong2, d2)
    images = [world.render(s) for s in (i1, i2, refined)]
    # the oracle's score, read from the known scenes (it reads rendered images exactly; tests check that)
    c = [min(world.scene_score(s, easy_prompt) / theta, 1.0) for s in (i1, i2)]
    e2 = c[1]
    e1 = min(c[0], e2)
    sim = world.prompt_overlap(easy_prompt, refine_prompt)
    return {
        "scenes": (i1, i2, refined),
        "images": images,
        "easy_prompt": easy_prompt,
        "refine_prompt": refine_prompt,
        "E1": e1,
        "E2": e2,
        "R1": e1 * sim,
        "R2": e2 * sim,
    }


def _variant(rng, scene: world.Scene, easy_attrs: list[str], n_wrong: int, detail: int) -> world.Scene:
    """A fresh scene that agrees with ``scene`` on all easy attributes but ``n_wrong`` of them."""
    wrong = list(rng.choice(easy_attrs, size=n_wrong, replace=False)) if n_wrong else []
    fixed = {a: getattr(scene, a) for a in easy_attrs if a not in wrong}
    for a in wrong:
        fixed[a] = str(rng.choice([v for v in world.VALUES[a] if v != getattr(scene, a)]))
    return world.random_scene(rng, detail=detail, **fixed)


def relabel(t: dict, theta: float = 1.0, scores: tuple[float, float] | None = None) -> dict:
    """Recompute a triplet's labels from the oracle reading its I1 and I2 pixels (after they changed);
    ``scores``: those readings' easy-prompt scores, when the caller already has them."""
    if scores is None:
        scores = tuple(world.oracle_score(im, t["easy_prompt"]) for im in t["images"][:2])
    c1, c2 = (min(s / theta, 1.0) for s in scores)
    sim = world.prompt_overlap(t["easy_prompt"], t["refine_prompt"])
    e1 = min(c1, c2)
    return {**t, "E1": e1, "E2": c2, "R1": e1 * sim, "R2": c2 * sim}


def use_generated(triplets: list[dict], chosen: list[int], images: np.ndarray, theta: float = 1.0) -> int:
    """Replace I1/I2 of the ``chosen`` triplets by two generated images of their easy prompt (``images``
    holds 2 per chosen triplet, (2k, H, W, 3)), the oracle's preferred one as the winner; pairs the oracle
    scores alike keep their rendered images. Returns how many triplets changed."""
    changed = 0
    for j, i in enumerate(chosen):
        t = triplets[i]
        pair = [images[2 * j], images[2 * j + 1]]
        scores = [world.oracle_score(im, t["easy_prompt"]) for im in pair]
        if scores[0] == scores[1]:
            continue
        lo, hi = (0, 1) if scores[0] < scores[1] else (1, 0)
        triplets[i] = relabel(
            {**t, "images": [pair[lo], pair[hi], t["images"][2]], "scenes": None},
            theta,
            scores=(scores[lo], scores[hi]),
        )
        changed += 1
    return changed


def draw_split(
    rng: np.random.Generator,
    n: int,
    split: str,
    seed: int = 0,
    theta: float = 1.0,
    generate=None,
    generated: float = 0.5,
    junk: float = 0.25,
) -> list[dict]:
    """``n`` triplets of ``split``, drawn with ``rng`` (the writer's generator of that split).

    With ``generate(prompts, seed) -> (B, H, W, 3)`` (the base pipeline), a ``generated`` fraction of the
    triplets take I1/I2 from it, as Pick-a-Pic's are generated. A ``junk`` fraction of losers get the
    strokes and speckles reward hacking produces, so the reward models learn those are no improvement."""
    triplets = [make_triplet(rng, theta) for _ in range(n)]
    if generate is not None:
        chosen = [i for i in range(n) if rng.random() < generated]
        prompts = [p for i in chosen for p in (triplets[i]["easy_prompt"],) * 2]
        if chosen:
            use_generated(triplets, chosen, generate(prompts, seed * 1000 + SPLIT_SEEDS.get(split, 9)), theta)
    for i in range(n):
        if rng.random() < junk:
            t = triplets[i]
            triplets[i] = relabel({**t, "images": [world.corrupt(t["images"][0], rng), *t["images"][1:]]}, theta)
    return triplets


def write_split(
    root: Path,
    split: str,
    n: int,
    seed: int,
    pickle: bool = False,
    theta: float = 1.0,
    generate=None,
    generated: float = 0.5,
    junk: float = 0.25,
):
    """Write ``n`` triplets of ``split`` under ``root`` (see ``draw_split``); returns the pandas DataFrame
    written. The same split as ``write_preference_set`` writes for that seed."""
    draw = partial(draw_split, seed=seed, theta=theta, generate=generate, generated=generated, junk=junk)
    return write_synthetic_set(root, draw, {split: n}, seed, _formats(pickle), IMAGE_NAMES)[split]


def write_preference_set(
    root: str | os.PathLike,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    pickle: bool = False,
    theta: float = 1.0,
    generate=None,
) -> dict[str, int]:
    """Write the train/val/test splits (default 4000/500/1000 triplets); returns the split sizes."""
    sizes = sizes or {"train": 4000, "val": 500, "test": 1000}
    draw = partial(draw_split, seed=seed, theta=theta, generate=generate)
    tables = write_synthetic_set(root, draw, sizes, seed, _formats(pickle), IMAGE_NAMES)
    return {split: len(table) for split, table in tables.items()}


def _formats(pickle: bool) -> tuple[str, ...]:
    return ("parquet", "pickle") if pickle else ("parquet",)


def pipeline_sampler(pipeline_dir: str | os.PathLike, steps: int = 10, guidance: float = 3.0, batch: int = 128):
    """``generate(prompts, seed) -> (B, H, W, 3)`` float images from a diffusers pipeline directory."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(pipeline_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(prompts: list[str], seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        out = [
            pipe(
                prompts[i : i + batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="pt",
                generator=g,
            ).images
            for i in range(0, len(prompts), batch)
        ]
        return torch.cat(out).permute(0, 2, 3, 1).float().numpy()

    return generate
