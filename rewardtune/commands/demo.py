"""``rewardtune demo``: the whole loop on a CPU in minutes, judged by the shapes world's oracle."""

from __future__ import annotations

from ..config import add_config_args, build_config
from ..demo.config import DemoConfig


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="fine-tune the bundled tiny shapes-world model on ICT-HP and report the oracle's verdict",
        description="Reward fine-tuning (DRaFT-K, LoRA) of the bundled tiny Stable Diffusion pipeline with the "
        "bundled ICT-HP reward, on a CPU in minutes. An oracle reads each image's attributes "
        "from its pixels, and a held-out CLIP the training never sees, so real improvement "
        "shows apart from reward hacking.",
    )
    p.add_argument("--config", default=None, help="YAML file of these options (flags override it)")
    add_config_args(p, DemoConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build_config(DemoConfig, args, config=args.config)
    if cfg.compare:
        from ..demo.compare import run_compare

        run_compare(cfg)
    else:
        from ..demo.runner import run_demo

        run_demo(cfg)
    return 0
