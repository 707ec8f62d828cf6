"""``rewardtune encode-prompts``: the flow models' prompt embeddings, once, for every later run."""

from __future__ import annotations

from ..config import add_config_args, build_config
from ..finetune.config import EncodePromptsConfig
from .common import add_threads_arg


def register(sub) -> None:
    p = sub.add_parser(
        "encode-prompts",
        help="encode a prompt set with an SD3/FLUX model's large text encoder once, into a directory that "
        "finetune --prompt-embeddings reuses (the encoder then never loads during training)",
        description="Only the text encoders load, on the GPU or the CPU (--text-encoder-device), quantized if asked "
        "(--quantize-text-encoder). Prompts already in the directory for the same model and encoder settings are "
        "skipped.",
    )
    add_config_args(p, EncodePromptsConfig)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..finetune.encode import encode_prompts

    cfg = build_config(EncodePromptsConfig, args)
    result = encode_prompts(cfg)
    already = result["prompts"] - result["encoded"]
    print(
        f"encode-prompts: {result['encoded']} prompt(s) encoded, {already} already there; in {result['directory']}",
        flush=True,
    )
    return 0
