"""``rewardtune finetune``: backpropagate a differentiable reward through the sampler into a LoRA."""

from __future__ import annotations

from .. import finetune, jsonio
from ..config import add_config_args, build_config
from ..finetune.config import FinetuneConfig
from .common import add_threads_arg


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="reward fine-tuning of SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 with LoRA (DRaFT-K, DRaFT-LV, ReFL, AlignProp)",
        description="Fine-tune a LoRA of the denoiser (UNet or transformer) by backpropagating a differentiable "
        "reward through the last denoising steps. Options come from defaults, then --config (a recipe), then flags. "
        "Many GPUs: accelerate launch -m rewardtune.cli finetune ...",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE",
        help="a YAML recipe (a path or a bundled name such as sd15_icthp_draftk)",
    )
    add_config_args(p, FinetuneConfig)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = build_config(FinetuneConfig, args, config=args.config)
    summary = finetune.run_finetune(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(jsonio.dumps({k: summary[k] for k in ("steps", "before", "after", "lora", "load")}, indent=2))
    return 0
