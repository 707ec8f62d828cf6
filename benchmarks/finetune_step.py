"""Seconds per fine-tuning step, images per second and peak memory of one ``rewardtune finetune`` config,
through the real ``Trainer``; plus each part of the step timed alone and the planner's prediction.

One config per process (peak memory is per process). Examples::

    # a full-size SDXL with random weights (no download), ICT-HP on two random ViT-H-14 towers
    python benchmarks/finetune_step.py --arch sdxl --resolution 1024 --k 1 --lora-rank 16 \
        --mixed-precision bf16 --sample-steps 30 --record results.jsonl --name sdxl-k1
    # a tiny pipeline on the CPU (what CI and the GPU script's dry run use)
    python benchmarks/finetune_step.py --tiny sd --k 1 --sample-steps 10 --record tiny.jsonl
    # a real SD3.5/FLUX directory, random ViT-H-14 reward towers, the planner on the shipped architecture
    python benchmarks/finetune_step.py --model /models/FLUX.1-dev --quantize-base nf4 --random-reward \
        --plan-model flux-dev --resolution 1024 --k 1 --record results.jsonl --name fluxdev-nf4

``--model DIR`` benchmarks a real pipeline instead (the reward then loads as in ``finetune``, unless
``--random-reward``).
Records are JSON lines; ``benchmarks/report.py`` turns them into the JSON + Markdown results.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import append_record, environment, median, peak_mib, reset_peak, sync, timed  # noqa: E402

from rewardtune import plan
from rewardtune.config import add_config_args, build_config, precision_dtype
from rewardtune.finetune import families
from rewardtune.finetune.config import FinetuneConfig
from rewardtune.finetune.trainer import Trainer
from rewardtune.plan import StorageTracker, predict_peak_memory
from rewardtune.testing import save_tiny_flow_pipeline, save_tiny_pipeline
from rewardtune.testing import tiny_clip_config as build_tiny_clip_config

# Tiny reward towers: real CLIP code, full CLIP tokenizer, a few thousand weights.
TINY_CLIP = dict(hidden=32, layers=2, heads=4, projection_dim=1024, image_size=224, patch_size=32)
# --tiny: the tiny pipeline of each family (flow variants: FLUX.1-schnell has no guidance embedding).
TINY_FAMILIES = {
    "sd": ("sd", ""),
    "sdxl": ("sdxl", ""),
    "sd3": ("sd3", ""),
    "flux": ("flux", ""),
    "flux-schnell": ("flux", "schnell"),
}


def save_tiny(name: str, directory: Path) -> str:
    family, variant = TINY_FAMILIES[name]
    if family in ("sd", "sdxl"):
        return str(save_tiny_pipeline(directory, family=family))
    return str(save_tiny_flow_pipeline(directory, family=family, variant=variant))


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--arch", choices=["sd15", "sdxl"], help="full-size architecture with random weights, built in memory"
    )
    src.add_argument(
        "--tiny", choices=sorted(TINY_FAMILIES), help="a tiny real pipeline and tiny reward towers (CPU smoke runs)"
    )
    p.add_argument(
        "--random-reward",
        action="store_true",
        help="with --model: the reward's ViT-H-14 towers with random weights (no reward download), as --arch uses",
    )
    p.add_argument(
        "--plan-model",
        default="",
        help="the model the planner predicts (a shipped architecture or alias, e.g. flux-dev) instead of --model",
    )
    p.add_argument("--config", help="a finetune recipe (YAML) the flags override")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--timed", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--no-parts", action="store_true", help="skip timing the parts of the step alone")
    p.add_argument("--no-predict", action="store_true", help="skip the planner's prediction")
    p.add_argument("--predict-only", action="store_true", help="only the planner's prediction (a 'prediction' record)")
    p.add_argument(
        "--track-tensors",
        action="store_true",
        help="also count the peak of live tensor storage over one extra step (CPU: RSS includes the interpreter)",
    )
    p.add_argument(
        "--vae-block-checkpointing",
        action="store_true",
        help="experiment: also checkpoint each VAE decoder block (diffusers' vae.enable_gradient_checkpointing)",
    )
    p.add_argument("--name", default="", help="label of this config in the results")
    p.add_argument("--record", default="", help="append the result as a JSON line to this file")
    add_config_args(p, FinetuneConfig, skip=("output", "steps"))
    return p.parse_args(argv)


def finetune_config(args, workdir: Path):
    over = {"output": str(workdir / "out"), "steps": args.warmup + 2 * args.timed + 2}
    if args.arch:
        over["model"] = args.arch
    return build_config(FinetuneConfig, args, config=args.config, **over)


def random_pipeline(arch: str, cfg, workdir: Path):
    """A random-weight full-size pipeline built on the GPU (handed to the Trainer instead of a model dir)."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = precision_dtype(cfg.mixed_precision)
    vae_dtype = torch.float32 if cfg.vae_fp32 else dtype
    return plan.build_pipeline(arch, dtype, device, tokenizer_dir=workdir / "tokenizer", vae_dtype=vae_dtype)


def build_reward(args, cfg, workdir: Path):
    """The reward module handed to the Trainer (None: the Trainer loads ``cfg.reward`` itself)."""

    name = cfg.reward if cfg.reward in ("ict", "hp", "icthp") else "icthp"
    dtype = precision_dtype(cfg.mixed_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        return plan.build_reward(
            name, dtype, device, tokenizer_dir=workdir / "tokenizer", clip_config=tiny_clip_config()
        )
    if args.arch or args.random_reward:
        return plan.build_reward(name, dtype, device, tokenizer_dir=workdir / "tokenizer")
    return None


def tiny_clip_config() -> dict:
    return build_tiny_clip_config(49408, **TINY_CLIP).to_dict()


def time_parts(trainer, n: int, offset: int = 0) -> dict:
    """Each part of one micro-batch, timed inside the Trainer's own ``micro_step`` (GPU synchronised at
    each part's start), and the optimizer step timed alone."""
    dev = trainer.device
    wall, cpu = {}, {}
    clock = {"name": None}

    def mark(name):
        sync(dev)
        now, now_cpu = time.perf_counter(), time.process_time()
        if clock["name"] is not None:
            wall.setdefault(clock["name"], []).append(now - clock["wall"])
            cpu.setdefault(clock["name"], []).append(now_cpu - clock["cpu"])
        clock.update(name=name, wall=now, cpu=now_cpu)

    for i in range(offset, offset + n):
        trainer.micro_step(
            trainer.batch_prompts(0, step=10_000 + i), trainer.batch_noise(0, step=10_000 + i), on_part=mark
        )
        _, w, c = timed(trainer.optimizer_step, dev)
        wall.setdefault("optimizer", []).append(w)
        cpu.setdefault("optimizer", []).append(c)
    return wall, cpu


def tracked_peak_mib(trainer) -> float:
    """Peak of live tensor storage over one step, counted as the planner counts it (real tensors; models that leave
    the accelerator are not counted, for every family alike)."""

    # the models a step keeps on the accelerator, as the planner counts them: SD/SDXL's text encoders; of the flow
    # families' (SD3's CLIP-L, CLIP-G and T5, FLUX's CLIP-L and T5), whose prompt embeddings are cached, only CLIP
    # encoders that are trained
    resident_text = [] if families.by_name(trainer.family).flow else trainer.adapter.text_encoders()
    with StorageTracker(512 if trainer.device.type == "cuda" else 1) as tracker:
        tracker.add_modules(
            trainer.unet,
            trainer.pipe.vae,
            trainer.reward,
            *{id(m): m for m in (*trainer.trained_text_encoders, *resident_text)}.values(),
        )
        tracker.add_optimizer(trainer.optimizer)
        trainer.step()
    return tracker.peak / 2**20


def predict(args, cfg, workdir: Path) -> dict:
    kw = {
        "vae_block_checkpointing": args.vae_block_checkpointing,
        "target": "cuda" if torch.cuda.is_available() else "cpu",
    }  # the device this benchmark measures
    if args.tiny:
        kw["pipeline_dir"] = cfg.model
        kw["reward_config"] = tiny_clip_config()
    elif args.plan_model:
        kw["pipeline_dir"] = args.plan_model
    t = time.perf_counter()
    out = predict_peak_memory(cfg, **kw)
    out["seconds"] = time.perf_counter() - t
    return out


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="rewardtune-bench-"))
    cfg = finetune_config(args, workdir)
    if args.tiny:
        cfg.model = save_tiny(args.tiny, workdir / "pipe")
    record = {
        "name": args.name,
        "source": args.arch or (f"tiny-{args.tiny}" if args.tiny else cfg.model),
        "config": {
            k: getattr(cfg, k)
            for k in (
                "method",
                "k",
                "resolution",
                "batch_size",
                "sample_steps",
                "gradient_checkpointing",
                "mixed_precision",
                "attention",
                "lora_rank",
                "reward",
                "vae_fp32",
                "optimizer",
                "guidance_scale",
                "quantize_base",
            )
        }
        | {"vae_block_checkpointing": args.vae_block_checkpointing},
        "env": environment(),
        "error": None,
    }
    prediction = None
    if not args.no_predict:
        try:
            prediction = predict(args, cfg, workdir)
        except Exception as exc:  # a planner failure must not lose the measurement
            prediction = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    record["prediction"] = prediction
    t0 = time.perf_counter()
    reward = build_reward(args, cfg, workdir)
    pipe = random_pipeline(args.arch, cfg, workdir) if args.arch else None
    trainer = Trainer(cfg, reward=reward, pipe=pipe)
    if args.vae_block_checkpointing:
        trainer.pipe.vae.enable_gradient_checkpointing()
    record["setup_seconds"] = time.perf_counter() - t0
    record["resolution"] = trainer.resolution
    record["config"].update(
        {k: getattr(trainer.cfg, k) for k in ("sample_steps", "guidance_scale")}
    )  # the model's defaults if unset
    dev = trainer.device
    for _ in range(args.warmup):
        trainer.step()
    # Whole steps and parts alternate, so a busy machine slows both alike.
    steps, cpu_steps, peaks = [], [], []
    wall_parts, cpu_parts = {}, {}
    kind = None
    for i in range(args.timed):
        reset_peak(dev)
        metrics, t, c = timed(trainer.step, dev)
        steps.append(t)
        cpu_steps.append(c)
        peak, kind = peak_mib(dev)
        peaks.append(peak)
        record["last_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        if not args.no_parts:
            w, c = time_parts(trainer, 1, offset=i)
            for name in w:
                wall_parts.setdefault(name, []).extend(w[name])
                cpu_parts.setdefault(name, []).extend(c[name])
    images = cfg.batch_size * trainer.accelerator.num_processes * cfg.grad_accum
    step_s = median(steps)
    record.update(
        {
            "device": str(dev),
            "step_seconds": steps,
            "step_seconds_median": step_s,
            "step_cpu_seconds_median": median(cpu_steps),
            "images_per_second": images / step_s if step_s else None,
            "peak_memory_mib": max(peaks),
            "peak_memory_kind": kind,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else None,
        }
    )
    if not args.no_parts:
        # The ratio compares like with like: the median whole step to the median of the per-iteration sums.
        sums = [sum(v[i] for v in wall_parts.values()) for i in range(args.timed)]
        cpu_sums = [sum(v[i] for v in cpu_parts.values()) for i in range(args.timed)]
        total, cpu_total = median(sums), median(cpu_sums)
        record.update(
            {
                "parts_seconds": {k: median(v) for k, v in wall_parts.items()},
                "parts_sum_seconds": total,
                "ratio_step_to_parts": step_s / total if total else None,
                "parts_cpu_seconds": {k: median(v) for k, v in cpu_parts.items()},
                "parts_cpu_sum_seconds": cpu_total,
                "ratio_step_to_parts_cpu": median(cpu_steps) / cpu_total if cpu_total else None,
            }
        )
    if args.track_tensors:
        record["peak_tensor_mib"] = tracked_peak_mib(trainer)
    if prediction and "peak_mib" in prediction:
        measured = record.get("peak_tensor_mib") if kind == "cpu_peak_rss" else record["peak_memory_mib"]
        if measured:
            record["prediction_error"] = prediction["peak_mib"] / measured - 1
            record["prediction_compared_to"] = "peak_tensor_mib" if kind == "cpu_peak_rss" else "peak_memory_mib"
    return record


def predict_only(args) -> int:
    """The planner's prediction of this config alone, recorded for the report to join by name."""
    record = {"kind": "prediction", "name": args.name, "error": None}
    try:
        workdir = Path(tempfile.mkdtemp(prefix="rewardtune-plan-"))
        cfg = finetune_config(args, workdir)
        if args.tiny:
            cfg.model = save_tiny(args.tiny, workdir / "pipe")
        record["prediction"] = predict(args, cfg, workdir)
    except Exception as exc:
        traceback.print_exc()
        record["error"] = f"{type(exc).__name__}: {exc}"[:1000]
    if args.record:
        append_record(args.record, record)
    print("PREDICTION", args.name, (record.get("prediction") or {}).get("peak_mib"), record["error"], flush=True)
    return 0 if record["error"] is None else 1


def main(argv=None) -> int:
    args = parse(argv)
    torch.manual_seed(0)
    if args.predict_only:
        return predict_only(args)
    try:
        record = run(args)
    except Exception as exc:
        traceback.print_exc()
        record = {
            "name": args.name,
            "source": args.arch or args.tiny or args.model,
            "error": f"{type(exc).__name__}: {exc}"[:1000],
            "oom": isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower(),
            "env": environment(),
        }
        if torch.cuda.is_available():
            record["peak_memory_mib"], record["peak_memory_kind"] = peak_mib("cuda")
    if args.record:
        append_record(args.record, record)
    summary = {
        k: record.get(k) for k in ("name", "step_seconds_median", "peak_memory_mib", "ratio_step_to_parts", "error")
    }
    if record.get("prediction"):
        summary["predicted_peak_mib"] = record["prediction"].get("peak_mib")
    print("RESULT", summary, flush=True)
    return 0 if record.get("error") is None else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
