"""Reward models: scoring speed (images/s) of ICT, HP or ICT-HP, and training speed (triplets/s) of the
ICT or HP stage through ``rewardtune.reward_training``'s own loss code, with peak memory.

    python benchmarks/reward_bench.py --task score --reward icthp --batch-size 16 --precision bf16
    python benchmarks/reward_bench.py --task train-ict --batch-size 8 --precision bf16 --checkpointing
    python benchmarks/reward_bench.py --tiny ...      # tiny CLIP towers (CPU smoke runs)

Full size is CLIP ViT-H-14 (the released ICT/HP backbone) with random weights: the same time and memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import append_record, environment, median, peak_mib, reset_peak, timed  # noqa: E402

from rewardtune.clip_tokenizer import write_clip_tokenizer
from rewardtune.config import precision_dtype
from rewardtune.plan import build_clip, build_reward
from rewardtune.reward_training.config import TrainRewardConfig
from rewardtune.reward_training.train import Stage
from rewardtune.testing import tiny_clip_config, write_clip_processor

PROMPTS = ["a red bicycle leaning against a stone wall", "two cats asleep on a sofa in the afternoon sun"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["score", "train-ict", "train-hp"], default="score")
    p.add_argument("--reward", choices=["ict", "hp", "icthp"], default="icthp", help="scoring: which reward")
    p.add_argument("--batch-size", type=int, default=16, help="images (score) or triplets (train) per step")
    p.add_argument("--image-size", type=int, default=512, help="scoring: input image size (resized to 224 inside)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16")
    p.add_argument("--checkpointing", action="store_true", help="training: gradient checkpointing")
    p.add_argument("--tiny", action="store_true", help="tiny CLIP towers instead of ViT-H-14")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--name", default="")
    p.add_argument("--record", default="")
    return p.parse_args(argv)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clip_config(tiny: bool) -> dict | None:
    if not tiny:
        return None

    return tiny_clip_config(
        49408, hidden=32, layers=2, heads=4, projection_dim=1024, image_size=224, patch_size=32
    ).to_dict()


def bench_score(args) -> dict:
    dev, dtype = device(), precision_dtype(args.precision)
    reward = build_reward(args.reward, dtype, dev, clip_config=clip_config(args.tiny))
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=dev)
    prompts = [PROMPTS[i % 2] for i in range(args.batch_size)]

    def step():
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return reward(images, prompts)

    for _ in range(args.warmup):
        step()
    reset_peak(dev)
    times = [timed(step, dev)[1] for _ in range(args.timed)]
    return {"seconds": times, "unit": "images/s"}


def save_backbone(directory: Path, tiny: bool) -> Path:
    """A random-weight HF CLIP directory (weights, config, the real CLIP tokenizer, preprocessor)."""

    dev = device()
    model = build_clip(torch.float16 if dev.type == "cuda" else torch.float32, dev, clip_config(tiny))
    model.save_pretrained(directory)
    write_clip_tokenizer(directory)
    write_clip_processor(directory, model.config.vision_config.image_size)
    del model
    return directory


def bench_train(args) -> dict:
    from accelerate import Accelerator

    dev = device()
    work = Path(tempfile.mkdtemp(prefix="rewardtune-rbench-"))
    backbone = save_backbone(work / "clip", args.tiny)
    stage_name = args.task.split("-")[1]
    cfg = TrainRewardConfig(
        stage=stage_name,
        data=str(work),
        output=str(work / "out"),
        backbone=str(backbone),
        ict=str(backbone) if stage_name == "hp" else None,
        batch_size=args.batch_size,
        mixed_precision=args.precision,
        gradient_checkpointing=args.checkpointing,
    )
    acc = Accelerator(mixed_precision=args.precision, cpu=dev.type == "cpu")
    stage = Stage(cfg, acc)
    trainee = stage.trainee.to(acc.device)
    stage.place_frozen()
    params = [p for p in trainee.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    size = stage.tower.model.config.vision_config.image_size
    b = args.batch_size
    batch = {
        f"pixels_{stage_name}": torch.randn(b, 3, 3, size, size, device=acc.device),
        "easy_prompt": [PROMPTS[i % 2] for i in range(b)],
        "refine_prompt": [PROMPTS[(i + 1) % 2] + ", detailed" for i in range(b)],
        "labels": torch.rand(b, 4, device=acc.device),
    }
    if stage_name == "hp" and "ict" in stage.preprocess:
        batch["pixels_ict"] = batch["pixels_hp"]

    def step():
        with acc.autocast():
            loss, _ = stage.loss(trainee, batch)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    reset_peak(acc.device)
    times = [timed(step, acc.device)[1] for _ in range(args.timed)]
    return {"seconds": times, "unit": "triplets/s", "trainable_params": sum(p.numel() for p in params)}


def main(argv=None) -> int:
    args = parse(argv)
    record = {
        "kind": "reward",
        "name": args.name or f"{args.task}-{args.reward if args.task == 'score' else ''}",
        "task": args.task,
        "backbone": "tiny-clip" if args.tiny else "ViT-H-14",
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.checkpointing,
        "env": environment(),
        "error": None,
    }
    if args.task == "score":
        record["reward"] = args.reward
        record["image_size"] = args.image_size
    try:
        out = bench_score(args) if args.task == "score" else bench_train(args)
        s = median(out.pop("seconds"))
        record.update(out, seconds_median=s, items_per_second=args.batch_size / s if s else None)
        record["peak_memory_mib"], record["peak_memory_kind"] = peak_mib(device())
    except Exception as exc:
        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        record["oom"] = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    if args.record:
        append_record(args.record, record)
    print(
        "RESULT",
        {k: record.get(k) for k in ("name", "seconds_median", "items_per_second", "peak_memory_mib", "error")},
        flush=True,
    )
    return 0 if record["error"] is None else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
