"""The demo's report: reward and oracle curves as inline SVG (no plotting library), before/after grids
as PNG, and a per-prompt table, in one self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import make_grid, save_image, to_uint8
from ..sources import atomic_write_text
from .world import ATTRIBUTES, VALUES

COLOURS = ["#111111", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
GRID_COLUMNS = 8
CHART_WIDTH = 560
GRID_SCALE = 3  # 32 px images, shown larger
SHOWN_PROMPTS = 16


def reward_label(reward: str) -> str:
    """How the report and the console name the training reward: 'ICT-HP' for icthp, else the spec itself."""
    return "ICT-HP" if reward == "icthp" else reward


ATTRIBUTE_DROP = 0.15  # ~2.5 standard errors of one attribute's accuracy on the 64 held-out prompts
SATURATION_RISE = 0.05  # mean HSV saturation


def hacking_signs(s: dict) -> list[str]:
    """What in a fine-tuning's before/after says its reward was hacked: the trained reward rising while the
    ground truth (oracle) or the judge that never trained (held-out CLIP) falls, or while one attribute the
    prompts ask for is given up (its accuracy down by ``ATTRIBUTE_DROP`` or more: every background one colour,
    say), and colour pushed to saturation."""
    signs = []
    rose = s["reward_after"] > s["reward_before"]
    if rose and s["oracle_after"] < s["oracle_before"]:
        signs.append("reward up, oracle down")
    if rose and s["heldout_reward_after"] < s["heldout_reward_before"]:
        signs.append("reward up, held-out CLIP down")
    before, after = s.get("attributes_before") or {}, s.get("attributes_after") or {}
    for a in ATTRIBUTES:
        if rose and before.get(a) is not None and after.get(a) is not None and before[a] - after[a] >= ATTRIBUTE_DROP:
            signs.append(f"{a} right {after[a] - before[a]:+.2f} (chance {1 / len(VALUES[a]):.2f})")
    sat0, sat1 = s.get("saturation_before"), s.get("saturation_after")
    if sat0 is not None and sat1 is not None and sat1 - sat0 > SATURATION_RISE:
        signs.append(f"saturation up {sat1 - sat0:+.2f}")
    return signs


def verdict(signs: list[str]) -> str:
    """One line on what ``hacking_signs`` found."""
    if signs:
        return "signs of reward hacking: " + "; ".join(signs)
    return (
        f"no sign of reward hacking (no asked-for attribute down {ATTRIBUTE_DROP} or more while the reward rose, "
        f"the oracle and the held-out CLIP not falling against it, saturation up less than {SATURATION_RISE})"
    )


def svg_chart(
    series: dict[str, list[tuple[float, float]]], title: str, width: int = CHART_WIDTH, height: int = 260
) -> str:
    """A line chart of named (x, y) series with axes, ticks and a legend, as an SVG element."""
    pts = [p for s in series.values() for p in s]
    left, right, top, bottom = 52, 190, 28, 34  # the legend sits on the right
    w, h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
    ]
    if not pts:
        return "".join(parts) + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.08 or 0.05
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * w, top + (1 - (y - y0) / (y1 - y0)) * h

    parts.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for v in np.linspace(y0, y1, 5):
        _, y = px(x0, v)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + w}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>'
        )
    for v in np.linspace(x0, x1, 5):
        x, _ = px(v, y0)
        parts.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="middle">{v:.0f}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (px(a, b) for a, b in s))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        if len(s) <= 30:
            parts += [
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in (px(a, b) for a, b in s)
            ]
        parts.append(
            f'<rect x="{left + w + 10}" y="{top + 6 + 14 * i}" width="10" height="3" fill="{colour}"/>'
            f'<text x="{left + w + 24}" y="{top + 10 + 14 * i}">{html.escape(name)}</text>'
        )
    return "".join(parts) + "</svg>"


def smooth(points: list[tuple[float, float]], window: int = 10) -> list[tuple[float, float]]:
    """Running mean over ``window`` points (the training reward is noisy, one batch per step)."""
    if len(points) <= 2:
        return points
    ys = np.array([p[1] for p in points], dtype=np.float64)
    out = [float(ys[max(0, i - window + 1) : i + 1].mean()) for i in range(len(ys))]
    return [(p[0], y) for p, y in zip(points, out)]


def _png_data(image: torch.Tensor, scale: int) -> str:
    arr = to_uint8(image)
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(out: Path, summary: dict, hook, prompts: list[str], train_rewards: list[tuple[int, float]]) -> None:
    """``report.html``, ``curves.svg``, ``before.png`` and ``after.png`` in ``out``."""
    first, last = min(hook.images), max(hook.images)
    before, after = hook.images[first], hook.images[last]
    for name, images in (("before.png", before), ("after.png", after)):
        grid = make_grid(images, ncol=GRID_COLUMNS)
        save_image(torch.nn.functional.interpolate(grid[None], scale_factor=GRID_SCALE, mode="nearest")[0], out / name)
    evals = summary["evaluations"]
    name = reward_label(summary["config"]["reward"])
    charts = [
        svg_chart(
            {
                "oracle (mean)": [(e["step"], e["oracle"]) for e in evals],
                **{a: [(e["step"], e[f"oracle_{a}"]) for e in evals if f"oracle_{a}" in e] for a in ATTRIBUTES},
            },
            "Oracle on held-out prompts: attributes shown",
        ),
        svg_chart(
            {
                f"{name} (held-out prompts)": [(e["step"], e["reward"]) for e in evals if "reward" in e],
                f"{name} (training batch, smoothed)": smooth(train_rewards),
            },
            "Training reward",
        ),
        svg_chart(
            {"held-out CLIP": [(e["step"], e["eval_reward"]) for e in evals if "eval_reward" in e]},
            "Held-out reward (never trained on)",
        ),
    ]
    atomic_write_text(out / "curves.svg", stack_svgs(charts))
    atomic_write_text(
        out / "report.html", _html(summary, charts, before, after, hook.scores[first], hook.scores[last], prompts)
    )


def stack_svgs(charts: list[str]) -> str:
    """One SVG with the charts side by side (for viewing outside the report)."""
    width = CHART_WIDTH * len(charts)
    inner = "".join(f'<g transform="translate({CHART_WIDTH * i},0)">{c}</g>' for i, c in enumerate(charts))
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="260">{inner}</svg>\n'


def _html(s: dict, charts: list[str], before, after, scores_before, scores_after, prompts) -> str:
    rows = []
    for i, p in enumerate(prompts[:SHOWN_PROMPTS]):
        rows.append(
            f"<tr><td>{html.escape(p)}</td><td><img src='{_png_data(before[i], 3)}'></td><td>{scores_before[i]:.2f}</td>"
            f"<td><img src='{_png_data(after[i], 3)}'></td><td>{scores_after[i]:.2f}</td></tr>"
        )
    pairs = [
        ("oracle (fraction of attributes shown)", s["oracle_before"], s["oracle_after"]),
        (f"{reward_label(s['config']['reward'])} reward (trained on)", s["reward_before"], s["reward_after"]),
        ("held-out CLIP (never trained on)", s["heldout_reward_before"], s["heldout_reward_after"]),
    ]
    pairs += [
        (f"&nbsp;&nbsp;{a} right", v, s["attributes_after"][a])
        for a, v in s["attributes_before"].items()
        if v is not None
    ]
    metric_rows = "".join(
        f"<tr><td>{name}</td><td>{x:.3f}</td><td>{y:.3f}</td><td>{y - x:+.3f}</td></tr>" for name, x, y in pairs
    )
    cfg = s["config"]
    signs = s.get("hacking_signs")
    signs = hacking_signs(s) if signs is None else signs
    changes = ", ".join(
        f"{a} {s['attributes_after'][a] - v:+.2f}" for a, v in s["attributes_before"].items() if v is not None
    )
    seen = (
        f"<p class='seen'><b>What the demo saw:</b> oracle {s['oracle_before']:.3f} &rarr; {s['oracle_after']:.3f} "
        f"({s['oracle_after'] - s['oracle_before']:+.3f}); per attribute: {changes}.</p>"
        f"<p class='{'hacked' if signs else 'seen'}'><b>{html.escape(verdict(signs)[:1].upper() + verdict(signs)[1:])}</b>"
        + (
            f". An attribute the prompts ask for that falls by {ATTRIBUTE_DROP} or more while the trained reward "
            f"rises is one the reward no longer asks for (the one-colour background collapse shows this way); the "
            f"oracle's mean can still rise past it.</p>"
            if signs
            else ".</p>"
        )
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rewardtune demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px}} img{{image-rendering:pixelated}} .grid img{{width:100%;max-width:540px}}
.seen{{background:#f3f6fa;padding:6px 10px}} .hacked{{background:#fdecea;padding:6px 10px}}</style>
</head><body>
<h1>rewardtune demo: reward fine-tuning in the shapes world</h1>
{seen}
<p>{s["steps"]} DRaFT-K (K={cfg["k"]}) LoRA steps on the bundled tiny Stable Diffusion pipeline, reward
{html.escape(reward_label(cfg["reward"]))},
{cfg["sample_steps"]} DDIM steps, guidance {cfg["guidance_scale"]}, in {s["seconds"]:.0f} s. Evaluated on
{len(prompts)} held-out prompts, one image each, with the same noise before and after. The oracle reads
colour, shape, size, position and background back from the pixels.</p>
<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>{metric_rows}</table>
<h2>Curves</h2>{"".join(charts)}
<h2>Images: before (left) and after (right)</h2>
<div class="grid"><img src="before.png"> <img src="after.png"></div>
<h2>Per prompt</h2>
<table><tr><th>prompt</th><th>before</th><th>oracle</th><th>after</th><th>oracle</th></tr>{"".join(rows)}</table>
</body></html>
"""
