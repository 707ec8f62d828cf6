"""``rewardtune demo --compare``: the paper's comparison in a world with ground truth.

The same fine-tuning of the same base (the demo's settings, seeds and prompts) once per reward -- ICT-HP, ICT,
HP, a PickScore-style preference model and the plain world CLIP -- each a complete demo in
``<output>/<reward>/``. Beside them: each reward's triplet accuracy on the regenerated test split (the code of
``rewardtune eval-reward``), and per reward the oracle and the held-out CLIP before and after, the colour
saturation, and the signs of reward hacking, in ``compare.json``, ``compare.md``, ``curves.svg`` and
``report.html``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import sys
import time
from pathlib import Path

from .. import jsonio
from ..errors import UserError
from ..reward_training import evaluate_rewards
from ..rewards import load_rewards
from ..rundir import RunDir, Start, config_settings
from ..sources import atomic_write_text
from . import world
from .data import pipeline_sampler, write_split
from .report import hacking_signs, stack_svgs, svg_chart
from .runner import DemoConfig, check_models, reward_sources, run_demo

COMPARED = ("icthp", "ict", "hp", "pickscore", "clip")
LABELS = {
    "icthp": "ICT-HP",
    "ict": "ICT",
    "hp": "HP",
    "pickscore": "PickScore-style",
    "clip": "CLIP (world base)",
}
SPLIT = "test"
SPLIT_DIR = "test_split"
OUTPUTS = ("compare.json", "compare.md", "curves.svg", "report.html")
# what a demo's summary.json says of its outcome (before and after, and how long)
MEASURES = ("oracle", "reward", "heldout_reward", "saturation", "attributes")
OUTCOME_KEYS = (*(f"{m}_{when}" for m in MEASURES for when in ("before", "after")), "steps", "seconds")


def accuracy_table(models: Path, data_root: Path) -> dict[str, dict]:
    """Triplet accuracy of every compared reward on ``data_root``'s test split: what ``rewardtune eval-reward
    --reward icthp,ict,hp,pickscore,clip`` with the bundled sources computes (its defaults: batches of 16)."""
    rewards = load_rewards(list(COMPARED), **reward_sources(models))
    return evaluate_rewards(data_root, SPLIT, rewards, batch_size=16, num_workers=0, progress=False)


def build_seed(models: Path) -> int:
    """The seed the bundle was built with: the test split regenerated with it is the build's own."""
    record = models / "build.json"
    return json.loads(record.read_text()).get("config", {}).get("seed", 0) if record.is_file() else 0


def run_compare(cfg: DemoConfig) -> dict:
    """Fine-tune once per reward, measure every reward's test accuracy, and write the comparison."""
    cfg.validate()
    if cfg.reward != DemoConfig.reward:
        raise UserError(f"demo: --compare trains on each of {', '.join(COMPARED)} in turn; leave out --reward")
    models, out = Path(cfg.models).expanduser(), Path(cfg.output).expanduser()
    check_models(models, list(COMPARED))
    rundir = run_dir(out)
    with rundir.lock():
        rundir.refuse_colliding()
        if "compare.json" in rundir.survey()[0] and not (cfg.overwrite or cfg.resume):
            raise UserError(
                f"demo: '{out}' holds a finished comparison; pass --overwrite to replace it or --resume to finish "
                f"or extend it"
            )
        # each reward's demo decides for its own directory (resume, refuse, start); --overwrite clears them first
        rundir.begin(Start("overwrite" if cfg.overwrite else "start"), cfg, config_settings(cfg, {}))
        return _compare(cfg, models, out)


def run_dir(out: Path) -> RunDir:
    """The comparison's directory: the test split and one demo directory per reward, the tables beside them."""
    return RunDir(
        out,
        who="demo: ",
        command="demo --compare",
        finished="compare.json",
        outputs=OUTPUTS[1:],
        scratch=(SPLIT_DIR, *COMPARED),
    )


def _compare(cfg: DemoConfig, models: Path, out: Path) -> dict:
    t0 = time.time()
    data_root = out / SPLIT_DIR
    if not (data_root / f"{SPLIT}.parquet").is_file():
        print(
            f"demo: compare: writing the {cfg.test_triplets}-triplet test split (the build's, regenerated)", flush=True
        )
        generate = pipeline_sampler(models / "pipeline")
        write_split(data_root, SPLIT, cfg.test_triplets, build_seed(models), generate=generate)
    accuracy = accuracy_table(models, data_root)
    print(
        "demo: compare: test accuracy (avg of I2>I1, I3>I2, I3>I1) "
        + ", ".join(f"{LABELS[n]} {accuracy[n]['avg']:.3f}" for n in COMPARED)
        + f"  {time.time() - t0:.0f} s",
        flush=True,
    )
    summaries, started = {}, time.time()
    for i, name in enumerate(COMPARED):
        left = ""
        if i:
            per_run = (time.time() - started) / i
            left = f"; {i} done, about {per_run * (len(COMPARED) - i):.0f} s left"
        print(f"demo: compare: reward {i + 1}/{len(COMPARED)}: {LABELS[name]}{left}", flush=True)
        run_demo(dataclasses.replace(cfg, reward=name, output=str(out / name), compare=False))
        summaries[name] = json.loads((out / name / "summary.json").read_text())
    result = comparison(cfg, accuracy, summaries, time.time() - t0)
    write_comparison(out, result)
    print(markdown(result))
    print(f"demo: compare: done in {result['seconds']:.0f} s; report {out / 'report.html'}", flush=True)
    sys.stdout.flush()
    return result


def comparison(cfg: DemoConfig, accuracy: dict, summaries: dict, seconds: float) -> dict:
    rows = {}
    for name, s in summaries.items():
        rows[name] = {
            "label": LABELS[name],
            "accuracy": accuracy[name],
            **{k: s[k] for k in OUTCOME_KEYS},
            "hacking_signs": hacking_signs(s),
            "evaluations": s["evaluations"],
        }
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("reward", "compare", "output")}
    return {
        "seconds": round(seconds, 1),
        "test_split": {"triplets": cfg.test_triplets},
        "rewards": rows,
        "config": settings,
    }


def write_comparison(out: Path, result: dict) -> None:
    """compare.json (written last: the comparison is finished when it is there), compare.md, curves.svg,
    report.html."""
    charts = comparison_charts(result)
    atomic_write_text(out / "curves.svg", stack_svgs(charts))
    atomic_write_text(out / "compare.md", markdown(result))
    atomic_write_text(out / "report.html", report_html(result, charts))
    atomic_write_text(out / "compare.json", jsonio.dumps(result, indent=2) + "\n")


def comparison_charts(result: dict) -> list[str]:
    """The curves of every reward on one plot each: oracle, held-out CLIP, colour saturation, and the trained
    reward's relative change (the rewards' scales differ: PickScore's is 100x a cosine)."""
    rows = result["rewards"]

    def series(key, relative=False):
        out = {}
        for r in rows.values():
            points = [(e["step"], e[key]) for e in r["evaluations"] if e.get(key) is not None]
            if relative and points:
                base = abs(points[0][1]) or 1.0
                points = [(x, (y - points[0][1]) / base) for x, y in points]
            out[r["label"]] = points
        return out

    return [
        svg_chart(series("oracle"), "Oracle on held-out prompts"),
        svg_chart(series("eval_reward"), "Held-out CLIP (never trained on)"),
        svg_chart(series("saturation"), "Colour saturation of held-out images"),
        svg_chart(series("reward", relative=True), "Trained reward, change / step-0 value"),
    ]


def _change(r: dict, key: str) -> str:
    a, b = r[f"{key}_before"], r[f"{key}_after"]
    return f"{a:.3f} → {b:.3f} ({b - a:+.3f})"


def table_rows(result: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The two tables of the comparison, as header and rows of cells: outcome per reward, and per attribute."""
    head = [
        "reward",
        "test acc. I2>I1",
        "I3>I2",
        "I3>I1",
        "avg",
        "oracle before → after",
        "held-out CLIP before → after",
        "saturation before → after",
        "trained reward before → after",
        "signs of hacking",
    ]
    rows = []
    for r in result["rewards"].values():
        a = r["accuracy"]
        rows.append(
            [
                r["label"],
                *(f"{a[k]:.3f}" for k in ("I2>I1", "I3>I2", "I3>I1", "avg")),
                _change(r, "oracle"),
                _change(r, "heldout_reward"),
                _change(r, "saturation"),
                _change(r, "reward"),
                "; ".join(r["hacking_signs"]) or "none",
            ]
        )
    attrs = [
        a
        for a in world.ATTRIBUTES
        if any(r["attributes_before"].get(a) is not None for r in result["rewards"].values())
    ]
    attr_head = ["reward", *(f"{a} right" for a in attrs)]
    attr_rows = [
        [
            r["label"],
            *(f"{r['attributes_before'][a]:.2f} → {r['attributes_after'][a]:.2f}" for a in attrs),
        ]
        for r in result["rewards"].values()
    ]
    return head, rows, attr_head, attr_rows


def markdown(result: dict) -> str:
    head, rows, attr_head, attr_rows = table_rows(result)

    def table(h, rs):
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rs])

    cfg = result["config"]
    steps = {r["steps"] for r in result["rewards"].values()}
    return f"""# rewardtune demo --compare

The same fine-tuning ({", ".join(map(str, sorted(steps)))} DRaFT-K steps, K={cfg["k"]}, batch {cfg["batch_size"]},
lr {cfg["lr"]}, seed {cfg["seed"]}) of the same base with each reward; {cfg["eval_size"]} held-out prompts, the same
noise before and after. Test accuracy: {result["test_split"]["triplets"]} triplets of the regenerated test split
(`rewardtune eval-reward`'s computation). {result["seconds"]:.0f} s in all.

{table(head, rows)}

Oracle per attribute, before → after:

{table(attr_head, attr_rows)}
"""


def report_html(result: dict, charts: list[str]) -> str:
    head, rows, attr_head, attr_rows = table_rows(result)

    def table(h, rs):
        cells = "".join(f"<th>{html.escape(c)}</th>" for c in h)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rs)
        return f"<table><tr>{cells}</tr>{body}</table>"

    links = " ".join(f"<a href='{n}/report.html'>{html.escape(LABELS[n])}</a>" for n in result["rewards"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rewardtune demo --compare</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:4px 8px;font-size:13px}}</style>
</head><body>
<h1>rewardtune demo --compare: the same fine-tuning with each reward</h1>
<p>Triplet accuracy on the test split ({result["test_split"]["triplets"]} triplets), and what fine-tuning on each reward
did to the oracle (ground truth), to a CLIP no fine-tuning saw, and to colour saturation. In {result["seconds"]:.0f} s.</p>
{table(head, rows)}
<h2>Oracle per attribute</h2>
{table(attr_head, attr_rows)}
<h2>Curves</h2>{"".join(charts)}
<p>Each run's own report, with its images: {links}</p>
</body></html>
"""
