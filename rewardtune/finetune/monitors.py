"""Reward-hacking monitors: measures of the evaluation images, each compared with the base model's value.

At every evaluation (``run.Evaluator``) the images of the evaluation prompts, rendered from ``--eval-seeds``
noise seeds each, give:

- ``saturation``: mean HSV saturation; over-saturated colour is a common sign of hacking (DanceGRPO#36).
- ``seed_similarity``: mean pairwise cosine similarity of the image embeddings of one prompt's seeds
  (needs ``--eval-seeds`` >= 2): every seed of a prompt drawing the same picture (HPSv3#19).
- ``prompt_similarity``: the same between different prompts (one seed at a time): every prompt drawing the
  same thing, e.g. one background colour for all (the demo's collapse).
- ``hf_energy``: the share of the finest-scale detail energy that a 2x2 checkerboard filter picks up
  (``hf_energy``): grid/checkerboard artifacts (flow_grpo#233).
- ``eval_reward``: the held-out reward (already measured by the evaluation), here its fall from the base in
  units of the base images' spread.
- ``temporal_consistency`` (video families only): mean cosine similarity of consecutive frames' embeddings
  (``video.temporal_consistency``); a fall is flicker. For videos the image monitors read each video's middle
  frame.

Each trips when it moves past a threshold relative to the step-0 (base model) evaluation (``Thresholds``);
``Watch`` remembers the first crossing of each and the last evaluation before any crossing, which
``--stop-on-hacking`` keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# name -> (metric key, kind of threshold, how the line says it)
MONITORS = {
    "saturation": "rise",
    "seed_similarity": "rise",
    "prompt_similarity": "rise",
    "hf_energy": "ratio",
    "eval_reward": "fall",
    "temporal_consistency": "drop",
}
EVAL_REWARD_SPREAD = "eval_reward_std"  # the per-image spread of the held-out reward, the unit of its threshold


def middle_frames(images: torch.Tensor) -> torch.Tensor:
    """Videos (B,3,F,H,W) -> their middle frames (B,3,H,W); images pass through."""
    return images[:, :, images.shape[2] // 2] if images.dim() == 5 else images


def saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation, (max - min) / max over the channels of each pixel, of images (B,3,H,W) in [0,1]."""
    hi, lo = images.amax(1), images.amin(1)
    return float(((hi - lo) / hi.clamp_min(1e-6)).mean())


def hf_energy(images: torch.Tensor) -> float:
    """The share of the finest-scale detail energy in the 2x2 checkerboard (Haar HH) response, pooled over the batch.

    Each 2x2 block [[a, b], [c, d]] of each channel has three detail responses: horizontal (a+b-c-d),
    vertical (a-b+c-d) and checkerboard (a-b-c+d). The checkerboard filter is a period-2 checkerboard's matched
    filter: such a pattern puts all its detail energy there (share 1), while constants, linear ramps and
    edges along the pixel grid give it none, and natural detail (curved or diagonal edges, texture) a minor
    part; i.i.d. noise gives a third. Pooled over the batch (sum of squares over sum of squares), flat images add
    little to either sum, so a collapse to plain backgrounds does not move it by itself."""
    x = images.float()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    horizontal, vertical, checker = a + b - c - d, a - b + c - d, a - b - c + d
    detail = horizontal.square().sum() + vertical.square().sum() + checker.square().sum()
    return float(checker.square().sum() / detail.clamp_min(1e-12))


def pixel_embedding(images: torch.Tensor) -> torch.Tensor:
    """The fallback embedding when no reward has an image tower: the image reduced to 16x16 by area, centred
    on its own mean (so that brightness alone does not make images alike)."""
    small = F.adaptive_avg_pool2d(images.float(), 16).flatten(1)
    return small - small.mean(1, keepdim=True)


def find_embedder(*rewards):
    """``(name, function images -> (B,D))``: the image tower (``encode_image``, images in [0,1]) of the first of
    ``rewards`` that has one anywhere inside (a CLIP-based reward's tower; a mix's parts), else the pixel fallback.
    The held-out reward comes first: it is the one the training did not push on."""
    for reward in rewards:
        if reward is None:
            continue
        for name, module in reward.named_modules():
            if callable(getattr(module, "encode_image", None)) and hasattr(module, "preprocess"):
                label = type(reward).__name__ + (f".{name}" if name else "")
                return label, module.encode_image
    return "pixels (16x16, mean-centred)", pixel_embedding


def similarities(embeddings: torch.Tensor) -> dict[str, float]:
    """Mean pairwise cosine similarity of (S seeds, P prompts, D) embeddings: between the seeds of one prompt
    (``seed_similarity``, needs S >= 2) and between different prompts of one seed (``prompt_similarity``, P >= 2)."""
    e = F.normalize(embeddings.float(), dim=-1)
    s, p = e.shape[:2]
    out = {}
    if s >= 2:
        per_prompt = torch.einsum("spd,tpd->pst", e, e)  # (P,S,S)
        out["seed_similarity"] = float(
            (per_prompt.sum((1, 2)) - per_prompt.diagonal(dim1=1, dim2=2).sum(1)).mean() / (s * (s - 1))
        )
    if p >= 2:
        per_seed = torch.einsum("spd,sqd->spq", e, e)  # (S,P,P)
        out["prompt_similarity"] = float(
            (per_seed.sum((1, 2)) - per_seed.diagonal(dim1=1, dim2=2).sum(1)).mean() / (p * (p - 1))
        )
    return out


def measure(images: torch.Tensor, seeds: int, embed) -> dict[str, float]:
    """The image monitors of one evaluation: ``images`` (seeds x prompts, 3, H, W), seed-major, in [0,1]."""
    n = images.shape[0] // seeds
    with torch.no_grad():
        emb = torch.cat([embed(images[i : i + n]).float().cpu() for i in range(0, len(images), n)])
    return {
        "saturation": saturation(images),
        "hf_energy": hf_energy(images),
        **similarities(emb.reshape(seeds, n, -1)),
    }


@dataclass
class Thresholds:
    """How far from the base model's value each monitor may go (0 = that monitor off).

    ``saturation``, ``seed_similarity``, ``prompt_similarity``: a rise by more than this; ``hf_energy``: more
    than this many times the base value; ``eval_reward``: a fall by more than this many base standard
    deviations of the per-image held-out reward (a scale every reward has); ``temporal_consistency``: a fall by
    more than this (videos)."""

    saturation: float = 0.1
    seed_similarity: float = 0.1
    prompt_similarity: float = 0.1
    hf_energy: float = 1.5
    eval_reward: float = 0.5
    temporal_consistency: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> Thresholds:
        return cls(**{name: getattr(cfg, f"monitor_{name}") for name in MONITORS})

    def limit(self, name: str, base: dict) -> float | None:
        """The value at which monitor ``name`` trips, from the base evaluation's metrics; None: not watched."""
        t, b = getattr(self, name), base.get(name)
        if not t or b is None:
            return None
        kind = MONITORS[name]
        if kind == "rise":
            return b + t
        if kind == "ratio":
            return b * t
        if kind == "drop":
            return b - t
        spread = base.get(EVAL_REWARD_SPREAD)
        return None if spread is None else b - t * spread


@dataclass
class Trip:
    name: str
    step: int
    value: float
    limit: float

    def describe(self) -> str:
        side = "<" if MONITORS[self.name] in ("fall", "drop") else ">"
        return f"{self.name} {self.value:.4f} {side} {self.limit:.4f} at step {self.step}"

    def as_dict(self) -> dict:
        return {"step": self.step, "value": self.value, "limit": self.limit}


@dataclass
class Watch:
    """The monitors over a run: ``observe`` each evaluation's metrics in step order, the first being the base.
    ``first_trips`` holds each monitor's first crossing; ``clean_step`` is the last evaluation's step before the
    first crossing of any (the one ``--stop-on-hacking`` keeps)."""

    thresholds: Thresholds
    base: dict | None = None
    first_trips: dict[str, Trip] = field(default_factory=dict)
    clean_step: int | None = None

    def limits(self) -> dict[str, float]:
        out = {}
        for name in MONITORS:
            lim = self.thresholds.limit(name, self.base or {})
            if lim is not None:
                out[name] = lim
        return out

    def check(self, step: int, metrics: dict) -> list[Trip]:
        """The monitors past their limits in ``metrics`` (without remembering anything)."""
        trips = []
        for name, lim in self.limits().items():
            v = metrics.get(name)
            if v is None:
                continue
            past = v < lim if MONITORS[name] in ("fall", "drop") else v > lim
            if past:
                trips.append(Trip(name, step, float(v), lim))
        return trips

    def observe(self, step: int, metrics: dict) -> list[Trip]:
        """Record one evaluation; returns the monitors that trip here for the first time."""
        if self.base is None:
            self.base = dict(metrics)
        trips = self.check(step, metrics)
        new = [t for t in trips if t.name not in self.first_trips]
        for t in new:
            self.first_trips[t.name] = t
        if not self.first_trips:
            self.clean_step = step
        return new

    @property
    def tripped(self) -> bool:
        return bool(self.first_trips)

    def state(self) -> dict:
        """What a checkpoint keeps, for ``restore``."""
        return {
            "base": self.base,
            "clean_step": self.clean_step,
            "first_trips": {n: t.as_dict() for n, t in self.first_trips.items()},
        }

    def restore(self, state: dict | None) -> None:
        if not state:
            return
        self.base = state.get("base")
        self.clean_step = state.get("clean_step")
        self.first_trips = {
            n: Trip(n, d["step"], d["value"], d["limit"]) for n, d in state.get("first_trips", {}).items()
        }

    def summary(self) -> dict:
        return {
            "thresholds": {n: getattr(self.thresholds, n) for n in MONITORS},
            "limits": self.limits(),
            "first_trips": {n: t.as_dict() for n, t in self.first_trips.items()},
            "clean_step": self.clean_step,
        }


def caption(metrics: dict, watch: Watch | None, step: int) -> str:
    """One line for a sample grid: each monitor's value, with the ones past their limit marked."""
    parts = []
    tripped = {t.name for t in watch.check(step, metrics)} if watch is not None and watch.base is not None else set()
    for name in MONITORS:
        v = metrics.get(name)
        if v is not None:
            parts.append(f"{name} {v:.3f}{' TRIPPED' if name in tripped else ''}")
    return f"step {step}: " + ", ".join(parts)
