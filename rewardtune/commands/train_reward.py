"""``rewardtune train-reward --stage ict|hp --data ROOT --backbone SRC --output DIR``: train ICT or HP.

Runs on accelerate: plain ``rewardtune train-reward ...`` on one device, or
``accelerate launch [--config_file recipes/accelerate/<ddp|deepspeed_zero2|fsdp>.yaml] -m rewardtune.cli train-reward ...``
on many GPUs or nodes.
"""

from __future__ import annotations

import os

from .. import jsonio, reward_training
from ..config import add_config_args, build_config
from ..reward_training.config import TrainRewardConfig
from ..sources import BEST_DIR
from .common import add_threads_arg


def register(sub) -> None:
    p = sub.add_parser(
        "train-reward",
        help="train the ICT or HP reward model on preference triplets",
        description="Train ICT (stage ict) or HP (stage hp, on a trained ICT) on Pick-High or your own "
        "triplets. Options come from defaults, then --config, then flags.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE",
        help="YAML recipe: a path or a bundled name (train_ict, train_hp); keys are the option names below, with underscores",
    )
    add_config_args(p, TrainRewardConfig)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build_config(TrainRewardConfig, args, config=args.config)
    metrics = reward_training.train_reward(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and not metrics.get("nothing_to_do"):
        shown = {k: v for k, v in metrics.items() if k.startswith("val/") and k.endswith("_avg")}
        print(f"trained {cfg.stage} to step {metrics['step']}; model in {cfg.output}")
        if "best_step" in metrics:
            print(
                f"best validation model: step {metrics['best_step']} ({metrics['best_metric']} "
                f"{metrics['best_value']:.4g}) in {os.path.join(cfg.output, BEST_DIR)}; "
                f"--{cfg.stage} {cfg.output} loads it"
            )
        if shown:
            print("validation accuracy: " + jsonio.dumps(shown))
    return 0
