"""Does the planner's one-layer trace give the numbers of tracing every layer, for each family's declared stacks
(``Family.layers``)? Per model: ``predict_peak_memory`` reduced and with ``full_depth=True`` (uncached), at 128 px,
DRaFT-K K=2 of 2 steps, bf16, ICT-HP with 3-layer towers (the full ViT-H-14 towers make the full trace slow and
are reduced by the same rule as SD3.5-Medium's test checks), 32 prompt tokens; every number and every phase's
peak compared, and both traces' seconds. ``tests/test_plan.py`` checks SD3.5-Medium this way in CI; this covers the
others, whose full traces take minutes::

    python benchmarks/plan_reduction.py qwen-image flux2-klein-4b z-image-turbo   # writes results/plan_reduction.*
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402
from demo_targets import commit, write_record  # noqa: E402

from rewardtune.finetune.config import FinetuneConfig  # noqa: E402
from rewardtune.plan import predict_peak_memory  # noqa: E402
from rewardtune.testing import tiny_clip_config  # noqa: E402

KEYS = ("peak_mib", "weights_mib", "resident_mib", "trainable_params")
REWARD = tiny_clip_config(49408, hidden=32, layers=3, heads=4, projection_dim=1024, image_size=224, patch_size=32)


def compare(model: str) -> dict:
    cfg = FinetuneConfig(
        model=model, output="unused", k=2, sample_steps=2, resolution=128, mixed_precision="bf16", reward="icthp",
        max_sequence_length=32,
    )  # fmt: skip
    reward = REWARD.to_dict()
    start = time.process_time()
    reduced = predict_peak_memory(cfg, reward_config=reward, cache=False)
    middle = time.process_time()
    full = predict_peak_memory(cfg, reward_config=reward, full_depth=True, cache=False)
    end = time.process_time()
    phases = sorted(set(reduced["part_peaks_mib"]) | set(full["part_peaks_mib"]))
    differ = [p for p in phases if reduced["part_peaks_mib"].get(p) != full["part_peaks_mib"].get(p)]
    return {
        "model": model,
        "equal": all(reduced[k] == full[k] for k in KEYS) and not differ,
        "phases_differing": differ,
        "traced_layers": reduced["traced_layers"],
        **{f"reduced_{k}": reduced[k] for k in KEYS},
        **{f"full_{k}": full[k] for k in KEYS},
        "reduced_cpu_s": round(middle - start, 1),
        "full_cpu_s": round(end - middle, 1),
    }


def report(record: dict) -> str:
    lines = [
        "# The planner's one-layer trace against tracing every layer",
        "",
        f"Commit `{record['commit']}`, {record['env']['date']}, {record['env']['cpu']}, torch "
        f"{record['env']['versions']['torch']}. `python benchmarks/plan_reduction.py {' '.join(record['models'])}`: "
        "128 px, DRaFT-K K=2 of 2 steps, bf16, ICT-HP with 3-layer towers, 32 prompt tokens, no cache.",
        "",
        "| model | stacks traced (1 layer -> full) | peak MiB reduced / full | every number and phase equal | CPU s reduced / full |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in record["results"]:
        stacks = ", ".join(f"{n} {a}->{b}" for n, (a, b) in r["traced_layers"].items())
        lines.append(
            f"| {r['model']} | {stacks} | {r['reduced_peak_mib']:.2f} / {r['full_peak_mib']:.2f} | "
            f"{'yes' if r['equal'] else 'NO: ' + ', '.join(r['phases_differing'])} | "
            f"{r['reduced_cpu_s']:g} / {r['full_cpu_s']:g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "plan_reduction")
    args = parser.parse_args()
    record = {"commit": commit(), "env": environment(), "models": args.models, "results": []}
    for model in args.models:
        record["results"].append(compare(model))
    write_record(args.output, record, report(record))


if __name__ == "__main__":
    main()
