"""``rewardtune plan``: predict the peak GPU memory of a fine-tuning config before it runs, and which
knobs make it fit a budget."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from .. import plan
from ..config import add_config_args, build_config, load_yaml, recipe_path
from ..errors import UserError
from ..finetune.config import FinetuneConfig
from ..plan import cache as plan_cache
from ..reward_training.config import TrainRewardConfig
from ..sizes import shown


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict the peak GPU memory of a finetune config; what fits a budget",
        description="Predict the peak GPU memory of one `rewardtune finetune` step before running it "
        "(a trace of the real step on fake tensors: nothing is allocated or downloaded). "
        "--model sd15/sdxl/sd35m/sd35l/fluxdev/fluxschnell and their aliases use the shipped architecture "
        "configs; a local diffusers directory is read for its configs only. Answers are kept in "
        "$REWARDTUNE_CACHE_DIR/plan (default ~/.cache/rewardtune/plan) and reused for the same inputs, code and "
        "library versions.",
    )
    p.add_argument("--config", default=None, help="a finetune recipe (YAML file or bundled name); flags override it")
    p.add_argument(
        "--budget-gib", type=float, default=None, help="GPU memory to fit in (GiB); suggests knobs if exceeded"
    )
    p.add_argument(
        "--target",
        choices=("cuda", "cpu"),
        default="cuda",
        help="predict a CUDA GPU (its attention kernels, autocast and allocator rounding) or a CPU run",
    )
    p.add_argument("--no-cache", action="store_true", help="trace again even if this plan was answered before")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_args(p, FinetuneConfig, skip=("output",))
    p.set_defaults(func=run)


def _refuse_train_reward_recipe(config: str | None) -> None:
    """A recipe for ``train-reward`` (its keys are TrainRewardConfig's, some unknown to finetune) is named as such."""
    if not config:
        return
    keys = set(load_yaml(recipe_path(config)))
    finetune = {f.name for f in dataclasses.fields(FinetuneConfig)}
    reward = {f.name for f in dataclasses.fields(TrainRewardConfig)}
    if keys - finetune and keys <= reward:
        key = "stage" if "stage" in keys else sorted(keys - finetune)[0]
        raise UserError(
            f"--config {config}: this is a train-reward recipe (it trains the ICT/HP reward models: '{key}'); "
            f"`rewardtune plan` plans `rewardtune finetune` configs: pass a finetune recipe (e.g. "
            f"sd15_icthp_draftk) or flags"
        )


def run(args) -> int:
    _refuse_train_reward_recipe(args.config)
    cfg = build_config(FinetuneConfig, args, config=args.config, output="(plan)")
    result = _cached(cfg, args) if not args.no_cache else None
    if result is None:
        kw = dict(target=args.target, cache=not args.no_cache)  # plan.* load the model code on first use
        if args.budget_gib is not None:
            result = plan.fit_budget(cfg, args.budget_gib, **kw)
        else:
            result = {"prediction": plan.predict_peak_memory(cfg, **kw)}
        if not args.no_cache:
            _store(cfg, args, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(cfg, result)
    return 0


def _digest(cfg, args) -> str:
    """The whole answer's key: the prediction's (``plan.cache.key``) and the budget."""
    base = plan_cache.key(cfg, None, None, False, args.target, False)
    return hashlib.sha256(f"{base}|budget={args.budget_gib}".encode()).hexdigest()


def _cached(cfg, args) -> dict | None:
    """A stored answer to this very command, looked up before any model code is imported."""
    cfg.validate()  # a bad config is an error, answered before or not
    return plan_cache.load(_digest(cfg, args))


def _store(cfg, args, result: dict) -> None:
    plan_cache.store(_digest(cfg, args), result)


PRECISION_NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _print(cfg, result: dict) -> None:
    p = result["prediction"]
    weights = PRECISION_NAMES.get(cfg.mixed_precision, cfg.mixed_precision)
    vae = "fp32" if cfg.vae_fp32 else weights
    base = f", base {p.get('quantize_base', cfg.quantize_base)}" if cfg.quantize_base != "none" else ""
    k = cfg.k if cfg.k is not None else "all steps"
    print(
        f"model {p['architecture']} ({p['family']}), {shown(p['resolution'])}, {cfg.method} K={k}, "
        f"batch {cfg.batch_size}, weights {weights}{base}, VAE {vae}, "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optimizer}, LoRA rank {cfg.lora_rank}, "
        f"reward {cfg.reward}"
    )
    print(f"predicted peak GPU memory: {p['peak_gib']:.2f} GiB")
    print(
        f"  weights (frozen model, reward, LoRA): {p['weights_mib'] / 1024:.2f} GiB; with optimizer states "
        f"{p['resident_mib'] / 1024:.2f} GiB; step activations and temporaries at the peak {p['activations_mib'] / 1024:.2f} GiB"
    )
    if p.get("host_mib"):
        print(
            f"  host memory (pinned) for the video decode's per-frame checkpoints until their backward pass: "
            f"{p['host_mib'] / 1024:.2f} GiB"
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
