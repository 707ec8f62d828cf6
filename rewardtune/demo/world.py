"""The shapes world: prompts built from attributes, a numpy renderer, and an oracle that reads the
attributes back from the pixels.

A scene is one shape on a plain background. Content attributes (what a prompt can ask for):
``colour``, ``shape``, ``size``, ``position``, ``background``. Besides them every image has a
``detail`` level that no prompt controls: 0 blurred and grainy, 1 flat, 2 shaded. Detail is the
image-only quality HP can learn and ICT need not.

The oracle scores an image against a prompt as the fraction of the prompt's attributes it shows,
in [0, 1]; it is exact on rendered images and tolerant of the blur and noise of generated ones.
"""

from __future__ import annotations

import colorsys
import re
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

IMAGE_SIZE = 32

COLOURS = {  # object colours: well-separated hues, so the oracle can classify by hue
    "red": (220, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6.0, "large": 10.0}  # radius in pixels at 32 px
POSITIONS = {"left": (-6.0, 0.0), "right": (6.0, 0.0), "top": (0.0, -6.0), "bottom": (0.0, 6.0), "center": (0.0, 0.0)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
DETAIL_PHRASE = "highly detailed"
ATTRIBUTES = ("colour", "shape", "size", "position", "background")
VALUES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Scene:
    """One drawable scene: every content attribute set, plus the image-only detail level."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    detail: int = 1
    jitter: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), compare=False)

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def random_scene(rng: np.random.Generator, detail: int | None = None, **fixed) -> Scene:
    """A scene with each attribute drawn uniformly unless given; small random offsets in place and size."""
    attrs = {a: fixed.get(a) or str(rng.choice(VALUES[a])) for a in ATTRIBUTES}
    d = int(rng.integers(0, 3)) if detail is None else int(detail)
    jitter = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(-0.6, 0.6)))
    return Scene(**attrs, detail=d, jitter=jitter)


def perturb(scene: Scene, rng: np.random.Generator, wrong: list[str]) -> Scene:
    """``scene`` with each attribute in ``wrong`` changed to a different random value."""
    changes = {}
    for a in wrong:
        others = [v for v in VALUES[a] if v != getattr(scene, a)]
        changes[a] = str(rng.choice(others))
    return replace(scene, **changes)


# ---------------------------------------------------------------- prompts


def make_prompt(attrs: dict[str, str], detailed: bool = False) -> str:
    """Text for a (partial) attribute dict: 'a small red circle on the left on a white background'."""
    words = ["a"]
    if "size" in attrs:
        words.append(attrs["size"])
    if "colour" in attrs:
        words.append(attrs["colour"])
    words.append(attrs.get("shape", "shape"))
    if "position" in attrs:
        words.append(POSITION_PHRASES[attrs["position"]])
    if "background" in attrs:
        words.append(f"on a {attrs['background']} background")
    text = " ".join(words)
    return f"{text}, {DETAIL_PHRASE}" if detailed else text


def parse_prompt(prompt: str) -> dict[str, str]:
    """The content attributes a prompt asks for (the inverse of ``make_prompt``, by keywords)."""
    text = prompt.lower()
    attrs = {}
    bg = re.search(r"on an? (\w+) background", text)
    if bg and bg.group(1) in BACKGROUNDS:
        attrs["background"] = bg.group(1)
        text = text.replace(bg.group(0), " ")
    tokens = re.findall(r"[a-z]+", text)
    for a in ("colour", "shape", "size"):
        hits = [t for t in tokens if t in VALUES[a]]
        if hits:
            attrs[a] = hits[0]
    for name, phrase in POSITION_PHRASES.items():
        if phrase in text or (name == "center" and "centre" in text):
            attrs["position"] = name
            break
    return attrs


def prompt_overlap(a: str, b: str) -> float:
    """Similarity of two prompts as the Jaccard overlap of their attribute-value sets (CLIP(P,P') stand-in)."""
    sa, sb = set(parse_prompt(a).items()), set(parse_prompt(b).items())
    return len(sa & sb) / max(1, len(sa | sb))


def world_words() -> list[str]:
    """Every word the world's prompts use (for the tiny tokenizers' vocabulary)."""
    words = {"a", "shape", "on", "the", "at", "in", "background", "an"} | set(DETAIL_PHRASE.split())
    for vals in VALUES.values():
        words |= set(vals)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------- renderer


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        s = 0.85 * r
        return (np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s)
    if shape == "triangle":  # apex up; the centroid sits near (cx, cy)
        top, base = cy - 1.1 * r, cy + 0.75 * r
        half = (ys - top) / (base - top) * r * 1.05
        return (ys >= top) & (ys <= base) & (np.abs(xs - cx) <= half)
    raise ValueError(f"unknown shape '{shape}'")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) image, edges replicated."""
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape[:2]
    pad = np.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    img = sum(k[i] * pad[i : i + h] for i in range(len(k)))
    pad = np.pad(img, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k[i] * pad[:, i : i + w] for i in range(len(k)))


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) float32 image in [0, 1], antialiased by supersampling."""
    n = size * supersample
    scale = size / IMAGE_SIZE
    coords = (np.arange(n) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    dx, dy = POSITIONS[scene.position]
    jx, jy, jr = scene.jitter
    cx, cy = (size / 2 + (dx + jx) * scale), (size / 2 + (dy + jy) * scale)
    r = (SIZES[scene.size] + jr) * scale
    img = np.empty((n, n, 3), np.float32)
    img[:] = np.array(BACKGROUNDS[scene.background], np.float32) / 255
    colour = np.array(COLOURS[scene.colour], np.float32) / 255
    mask = _shape_mask(scene.shape, cx, cy, r, xs, ys)
    img[mask] = colour
    if scene.detail >= 2:  # soft shading: lit from the upper left, as if the shape had volume
        g = np.clip(((cx - xs) + (cy - ys)) / (1.4 * r), -1, 1)[mask][:, None]
        img[mask] = np.where(g > 0, colour + (1 - colour) * 0.45 * g, colour * (1 + 0.45 * g))
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    if scene.detail <= 0:  # low quality: blurred and grainy
        img = _blur(img, 1.0 * scale)
        grain = np.random.default_rng(int(1e6 * abs(jx) + 1e3 * abs(jy) + 7)).normal(0, 0.04, img.shape)
        img = img + grain.astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """(B, 3, size, size) float32 in [0, 1]."""
    return np.stack([render(s, size) for s in scenes]).transpose(0, 3, 1, 2)


def corrupt(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Junk of the kind reward hacking produces: stray coloured strokes, speckled patches and cuts
    through the object, on an (H, W, 3) image in [0, 1]. A copy; the input is left alone."""
    img = np.array(image, dtype=np.float32)
    h, w = img.shape[:2]
    palette = [np.array(c, np.float32) / 255 for c in COLOURS.values()] + [
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
    ]
    bg = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    kinds = rng.choice(["strokes", "speckle", "cuts"], size=int(rng.integers(1, 4)), replace=False)
    for kind in kinds:
        if kind == "speckle":
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            ph, pw = rng.integers(6, 13), rng.integers(6, 13)
            patch = img[y : y + ph, x : x + pw]
            noise = np.stack([palette[i] for i in rng.integers(0, len(palette), patch.shape[:2]).ravel()]).reshape(
                patch.shape
            )
            img[y : y + ph, x : x + pw] = 0.4 * patch + 0.6 * noise
            continue
        for _ in range(int(rng.integers(2, 6))):
            colour = bg if kind == "cuts" else palette[rng.integers(0, len(palette))]
            (x0, y0), angle = rng.uniform(0, w, 2), rng.uniform(0, np.pi)
            length = rng.uniform(6, 20)
            t = np.linspace(-0.5, 0.5, 40)[:, None] * length
            pts = np.round(np.array([x0, y0]) + t * np.array([np.cos(angle), np.sin(angle)])).astype(int)
            ok = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
            img[pts[ok, 1], pts[ok, 0]] = colour
    return np.clip(img, 0, 1)


# ---------------------------------------------------------------- oracle


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (stray pixels of generated images dropped)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _nearest(rgb: np.ndarray, palette: dict[str, tuple]) -> str:
    return min(palette, key=lambda k: float(np.sum((rgb - np.array(palette[k]) / 255) ** 2)))


def _hue_name(rgb: np.ndarray) -> str | None:
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
    if s < 0.2 or v < 0.15:
        return None  # grey-ish: no colour
    hue = h * 360
    return min(_HUES, key=lambda k: min(abs(hue - _HUES[k]), 360 - abs(hue - _HUES[k])))


SHAPE_AREA = {"circle": np.pi, "square": 1.7**2, "triangle": 0.5 * 2.1 * 1.85}  # area / r^2 of _shape_mask
SHAPE_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": (-1.1 + 2 / 3 * 1.85)}  # centroid y - cy, over r
TEMPLATE_BLURS = (0.0, 0.7, 1.2, 1.8)


def _template(shape: str, cx: float, cy: float, r: float, h: int, w: int, sigma: float, ss: int = 4) -> np.ndarray:
    """The world's drawing of ``shape`` as a soft (h, w) mask, antialiased, optionally blurred."""
    ys, xs = np.mgrid[0 : h * ss, 0 : w * ss]
    m = _shape_mask(shape, cx, cy, r, (xs + 0.5) / ss, (ys + 0.5) / ss).astype(np.float32)
    m = m.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return _blur(m[..., None], sigma)[..., 0] if sigma > 0 else m


def _fit_shape(soft: np.ndarray) -> tuple[str, float]:
    """(shape, radius in pixels) whose drawing, at the object's centroid and area and blurred as much
    as fits best, explains the object's soft silhouette with the least squared error."""
    h, w = soft.shape
    area = float(soft.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((soft * xs).sum() / area), float((soft * ys).sum() / area)
    best, best_r, best_err = "circle", 0.0, np.inf
    for shape in SHAPES:
        r = np.sqrt(area / SHAPE_AREA[shape])
        for sigma in TEMPLATE_BLURS:
            t = _template(shape, cx, cy - SHAPE_CENTROID_DY[shape] * r, r, h, w, sigma)
            err = float(((t - soft) ** 2).sum())
            if err < best_err:
                best, best_r, best_err = shape, r, err
    return best, best_r


def read_scene(image: np.ndarray) -> dict[str, str | None]:
    """The attributes an image shows, read from its pixels: (H, W, 3) or (3, H, W) floats in [0, 1].

    Background: the median border colour. Object: the largest blob that differs from it. Colour: the hue
    of the blob's median pixel. Shape and size: the world's drawing that best explains the blob's soft
    silhouette. Position: the silhouette's centroid."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    h, w = img.shape[:2]
    scale = IMAGE_SIZE / w
    border = np.concatenate(
        [img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)]
    )
    bg_rgb = np.median(border, axis=0)
    out: dict[str, str | None] = {
        "background": _nearest(bg_rgb, BACKGROUNDS),
        "colour": None,
        "shape": None,
        "size": None,
        "position": None,
    }
    diff = np.linalg.norm(img - bg_rgb, axis=-1)
    peak = np.percentile(diff, 99)
    if peak <= 0.15:
        return out
    mask = _largest_component(diff > max(0.12, 0.3 * peak))
    if mask.sum() < 4 / scale**2:
        return out
    ys, xs = np.nonzero(mask)
    out["colour"] = _hue_name(np.median(img[ys, xs], axis=0))
    # the silhouette on a crop around the blob (templates are drawn only there)
    y0, y1 = max(ys.min() - 4, 0), min(ys.max() + 5, h)
    x0, x1 = max(xs.min() - 4, 0), min(xs.max() + 5, w)
    region = _dilate(_dilate(mask))[y0:y1, x0:x1]
    soft = np.clip(diff[y0:y1, x0:x1] / (0.85 * np.median(diff[ys, xs])), 0, 1) * region
    out["shape"], r = _fit_shape(soft)
    out["size"] = "large" if r * scale >= (SIZES["small"] + SIZES["large"]) / 2 else "small"
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    dx = (float((soft * gx).sum() / soft.sum()) - w / 2) * scale
    dy = (float((soft * gy).sum() / soft.sum()) - h / 2) * scale
    if max(abs(dx), abs(dy)) < 3.25:
        out["position"] = "center"
    elif abs(dx) >= abs(dy):
        out["position"] = "left" if dx < 0 else "right"
    else:
        out["position"] = "top" if dy < 0 else "bottom"
    return out


def shown_fraction(shown: dict[str, str | None], wanted: dict[str, str]) -> float:
    """Fraction of the ``wanted`` attribute values that ``shown`` has, in [0, 1] (1.0 when nothing is wanted)."""
    if not wanted:
        return 1.0
    return sum(shown.get(a) == v for a, v in wanted.items()) / len(wanted)


def oracle_score(image: np.ndarray, prompt: str) -> float:
    """Fraction of the prompt's content attributes the image shows, in [0, 1] (1.0 for a prompt asking nothing)."""
    wanted = parse_prompt(prompt)
    return shown_fraction(read_scene(image), wanted) if wanted else 1.0


def scene_score(scene: Scene, prompt: str) -> float:
    """The oracle's score from a scene's known attributes (equal to ``oracle_score(render(scene), prompt)``)."""
    return shown_fraction(scene.attributes(), parse_prompt(prompt))


def oracle_scores(images, prompts: list[str]) -> np.ndarray:
    """Oracle scores of a batch: images (B, 3, H, W) tensor or array in [0, 1]."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return np.array([oracle_score(im, p) for im, p in zip(arr, prompts)], dtype=np.float32)
