"""``rewardtune score IMAGE... --prompt TEXT``: score images with one or more rewards."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import jsonio
from ..errors import UserError
from ..prompt_checks import is_blank, report_long_prompts, reward_limits
from .common import add_source_args, add_threads_arg, parse_device, parse_dtype, sources_from_args

# What a directory argument contributes: its files with these suffixes (any case), sorted by name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score images with ICT, HP, ICT-HP or a baseline reward",
        description="Score images against prompts. One --prompt for all images, or one per image.",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (PNG, JPEG, ...) or directories (their image files, sorted by name)",
    )
    p.add_argument("--prompt", action="append", required=True, help="the prompt; repeat it to give one per image")
    p.add_argument("--reward", default="ict,hp,icthp", help="comma-separated reward names (default: ict,hp,icthp)")
    add_source_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype: fp32, fp16 or bf16 (default: fp32)")
    add_threads_arg(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--json", action="store_true", help="print only a JSON array, one object per image")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..images import load_image
    from ..rewards import load_rewards, parse_spec, score_by_size

    paths = expand_images(args.images)
    prompts = list(args.prompt)
    check_prompts(prompts, paths)
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths):
        raise UserError(
            f"--prompt: got {len(prompts)} prompts for {len(paths)} images; give one prompt, or one per image"
        )
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    names = [n for n, w in parse_spec(args.reward)]
    if any(w is not None for _, w in parse_spec(args.reward)):
        raise UserError("--reward: score takes plain names (e.g. ict,hp,icthp); weights belong to finetune")
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    images = [load_image(p) for p in paths]  # fail on a bad file before loading models
    rewards = load_rewards(names, device=device, dtype=dtype, **sources_from_args(args))
    report_long_prompts(prompts, reward_limits(rewards))
    results = [{"image": str(p), "prompt": t} for p, t in zip(paths, prompts)]
    with torch.no_grad():
        table = score_by_size(
            lambda x, ps: torch.stack([r(x, ps).float() for r in rewards.values()], -1),
            images,
            prompts,
            batch_size=args.batch_size,
            device=device,
            desc="scoring",
        )
    for row, scores in zip(results, table.tolist()):
        row.update(zip(rewards, scores))
    if args.json:
        print(jsonio.dumps(results, indent=2))
    else:
        _print_table(results, names)
    return 0


def check_prompts(prompts: list[str], paths: list[Path]) -> None:
    """An empty prompt scores nothing meaningful: refuse it, naming which ``--prompt`` it is."""

    for i, text in enumerate(prompts):
        if is_blank(text):
            which = "--prompt" if len(prompts) == 1 else f"--prompt number {i + 1}"
            image = f" (for '{paths[i]}')" if len(prompts) == len(paths) > 1 else ""
            raise UserError(f"{which}{image} is empty ({text!r}); give the text the image should show")


def expand_images(args: list[str]) -> list[Path]:
    """The image arguments as files: a directory stands for its image files (by suffix, sorted by name,
    not recursing); what else it holds is skipped and counted in a note. A directory without images is an error."""
    out = []
    for arg in args:
        path = Path(arg)
        if not path.is_dir():
            out.append(path)
            continue
        entries = sorted(path.iterdir(), key=lambda p: p.name)
        found = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        other = len(entries) - len(found)
        if not found:
            held = f"it holds {other} other entr{'y' if other == 1 else 'ies'}" if other else "it is empty"
            raise UserError(
                f"image directory '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); {held}; "
                f"give a directory of images or the image files"
            )
        if other:
            print(
                f"note: '{path}': scoring its {len(found)} image file{'s' if len(found) > 1 else ''}, skipping "
                f"{other} other entr{'y' if other == 1 else 'ies'} (not {'/'.join(IMAGE_SUFFIXES)})",
                file=sys.stderr,
            )
        out.extend(found)
    return out


def _print_table(results: list[dict], names: list[str]) -> None:
    iw = max(5, *(len(r["image"]) for r in results))
    header = f"{'image':<{iw}}  " + "  ".join(f"{n:>9}" for n in names) + "  prompt"
    print(header)
    print("-" * len(header))
    for r in results:
        prompt = r["prompt"] if len(r["prompt"]) <= 60 else r["prompt"][:57] + "..."
        print(f"{r['image']:<{iw}}  " + "  ".join(f"{r[n]:>9.4f}" for n in names) + f"  {prompt}")
