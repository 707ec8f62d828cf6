"""``rewardtune data convert|check|synthetic``: preference triplet files."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="convert, check or generate preference triplet data",
        description="Preference triplet data: convert the published Pick-High pickles to Parquet, "
        "check a data root, or write a small synthetic set.",
    )
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = actions.add_parser("convert", help="write <split>.parquet from the published Pick-High/<split>.pkl, once")
    c.add_argument("root", help="data root holding Pick-High/ (and pick_easy_img/, pick_refine_img/)")
    c.add_argument(
        "--out",
        default=None,
        help="where the Parquet files go (default: the root; image paths are written relative to it)",
    )
    c.add_argument("--split", nargs="+", default=None, help="splits to convert (default: every Pick-High/*.pkl)")
    c.add_argument(
        "--trust-pickle", action="store_true", help="required: converting reads the pickles, and a pickle can run code"
    )
    c.set_defaults(func=run_convert)

    k = actions.add_parser("check", help="validate splits up front: columns, images, labels")
    k.add_argument("root", help="data root")
    k.add_argument(
        "--split",
        nargs="+",
        default=["train", "val", "test"],
        help="splits to check (default: train val test, those present)",
    )
    k.add_argument("--trust-pickle", action="store_true", help="allow the published .pkl split files")
    k.set_defaults(func=run_check)

    s = actions.add_parser("synthetic", help="write a small synthetic set (coloured shapes) in the Pick-High layout")
    s.add_argument("out", help="output data root")
    s.add_argument("--train", type=int, default=64, help="training triplets (default: 64)")
    s.add_argument("--val", type=int, default=16, help="validation triplets (default: 16)")
    s.add_argument("--test", type=int, default=32, help="test triplets (default: 32)")
    s.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument(
        "--format",
        nargs="+",
        default=["parquet"],
        choices=["parquet", "jsonl", "pickle"],
        help="table formats to write (default: parquet)",
    )
    s.set_defaults(func=run_synthetic)


def run_convert(args) -> int:
    from ..data import convert_pickles

    for path in convert_pickles(args.root, out=args.out, splits=args.split, trust_pickle=args.trust_pickle):
        print(f"wrote {path}")
    return 0


def run_check(args) -> int:
    from ..data import find_split, load_triplets

    present = []
    for split in args.split:
        try:
            find_split(args.root, split)
            present.append(split)
        except UserError:
            continue
    if not present:
        find_split(args.root, args.split[0])  # raises the message naming what was expected
    for split in present:
        table = load_triplets(args.root, split, trust_pickle=args.trust_pickle)
        print(f"{split}: {len(table)} triplets OK ({table.path})")
    return 0


def run_synthetic(args) -> int:
    from ..data.synthetic import make_pick_high

    for name in ("train", "val", "test", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"data synthetic: --{name} must be at least 1")
    counts = make_pick_high(
        Path(args.out),
        {"train": args.train, "val": args.val, "test": args.test},
        size=args.size,
        seed=args.seed,
        formats=tuple(args.format),
    )
    print(
        f"wrote {sum(counts.values())} triplets ({', '.join(f'{k} {v}' for k, v in counts.items())}) under {args.out}"
    )
    return 0
