"""``rewardtune plan``: predict the peak GPU memory of a fine-tuning config before it runs, and which
knobs make it fit a budget."""

from __future__ import annotations

import json

from ..config import add_config_args, build_config
from ..finetune.config import FinetuneConfig


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict the peak GPU memory of a finetune config; what fits a budget",
        description="Predict the peak GPU memory of one `rewardtune finetune` step before running it "
        "(a trace of the real step on fake tensors: nothing is allocated or downloaded). "
        "--model sd15/sdxl use the shipped architecture configs; a local diffusers "
        "directory is read for its configs only.",
    )
    p.add_argument("--config", default=None, help="a finetune recipe (YAML file or bundled name); flags override it")
    p.add_argument(
        "--budget-gib", type=float, default=None, help="GPU memory to fit in (GiB); suggests knobs if exceeded"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_args(p, FinetuneConfig, skip=("output",))
    p.set_defaults(func=run)


def run(args) -> int:
    from ..plan import fit_budget, predict_peak_memory

    cfg = build_config(FinetuneConfig, args, config=args.config, output="(plan)")
    if args.budget_gib is not None:
        result = fit_budget(cfg, args.budget_gib)
    else:
        result = {"prediction": predict_peak_memory(cfg)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(cfg, result)
    return 0


def _print(cfg, result: dict) -> None:
    p = result["prediction"]
    print(
        f"model {p['architecture']} ({p['family']}), {p['resolution']}x{p['resolution']}, {cfg.method} K={cfg.k}, "
        f"batch {cfg.batch_size}, {cfg.mixed_precision} (VAE {'fp32' if cfg.vae_fp32 else 'same'}), "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer}, LoRA rank {cfg.lora_rank}, "
        f"reward {cfg.reward}"
    )
    print(f"predicted peak GPU memory: {p['peak_gib']:.2f} GiB")
    print(
        f"  weights (frozen model, reward, LoRA): {p['weights_mib'] / 1024:.2f} GiB; with optimizer states "
        f"{p['resident_mib'] / 1024:.2f} GiB; step activations and temporaries at the peak {p['activations_mib'] / 1024:.2f} GiB"
    )
    if "budget_gib" not in result:
        return
    if result["fits"]:
        print(f"fits the budget of {result['budget_gib']:g} GiB")
        return
    print(f"does NOT fit the budget of {result['budget_gib']:g} GiB; changes, one at a time:")
    for s in result["suggestions"]:
        print(f"  {s['change']:<40} -> {s['peak_gib']:.2f} GiB {'fits' if s['fits'] else ''}")
    comb = result.get("combined")
    if comb:
        verdict = "fits" if comb["fits"] else "still does not fit"
        peak = f"{comb['peak_gib']:.2f} GiB" if comb.get("peak_gib") is not None else "?"
        print(f"  together: {' '.join(comb['changes'])} -> {peak} ({verdict})")
