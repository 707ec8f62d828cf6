"""Flags and parsing shared by several subcommands."""

from __future__ import annotations

import argparse

import torch

from ..config import precision_dtype
from ..errors import UserError

DTYPE_NAMES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")  # --dtype; config.precision_dtype maps them

SOURCE_HELP = {
    "ict": "ICT checkpoint: a local directory (released layout or ours) or hub id (default: 8y/ICT)",
    "hp": "HP checkpoint: a directory with hp_backbone/ and hp_scorer/, or hub id (default: 8y/HP)",
    "backbone": "CLIP backbone the ICT/HP checkpoints lay over (default: the checkpoint dir if it is a full CLIP, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "clip": "CLIP model for the 'clip' reward (default: openai/clip-vit-large-patch14)",
    "pickscore": "PickScore model (default: yuvalkirstain/PickScore_v1)",
    "hpsv2": "HPS v2 checkpoint file or directory (default: xswu/HPSv2)",
    "aesthetic": "LAION aesthetic predictor directory (default: camenduru/improved-aesthetic-predictor)",
}


def add_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reward sources (local directories or hub ids)")
    for key, text in SOURCE_HELP.items():
        group.add_argument(f"--{key}", dest=f"src_{key}", default=None, metavar="SRC", help=text)


def sources_from_args(args: argparse.Namespace) -> dict:
    return {k: getattr(args, f"src_{k}") for k in SOURCE_HELP if getattr(args, f"src_{k}", None) is not None}


def parse_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device '{name}': no CUDA GPU is available here; use --device cpu")
    return dev


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, ""):
        return None
    if name not in DTYPE_NAMES:
        raise UserError(f"--dtype '{name}' is not one of {', '.join(sorted(DTYPE_NAMES))}")
    return precision_dtype(name)
