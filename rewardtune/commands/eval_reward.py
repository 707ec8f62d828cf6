"""``rewardtune eval-reward --data ROOT --split test --reward NAMES``: the paper's triplet-accuracy table."""

from __future__ import annotations

from .. import jsonio, reward_training
from ..errors import UserError
from .common import add_source_args, add_threads_arg, parse_device, parse_dtype, sources_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "eval-reward",
        help="triplet accuracy (I2>I1, I3>I2, I3>I1) of rewards on a data split",
        description="Accuracy of each reward at ranking preference triplets, as in the paper's table. "
        "Ties count as wrong; icthp ranks by ICT x softmax(HP) over the triplet.",
    )
    p.add_argument(
        "--data", required=True, metavar="ROOT", help="data root (<split>.parquet/.jsonl or Pick-High/<split>.pkl)"
    )
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--reward", default="ict,hp,icthp", help="comma-separated reward names (default: ict,hp,icthp)")
    add_source_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="triplets per batch (default: 16)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N triplets only (default: all)")
    p.add_argument("--num-workers", type=int, default=2, help="image loading worker processes (default: 2)")
    p.add_argument(
        "--trust-pickle", action="store_true", help="allow the published .pkl split files (a pickle can run code)"
    )
    p.add_argument("--skip-bad", action="store_true", help="drop bad rows instead of stopping")
    p.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_false",
        help="skip opening every image up front (for a large set already checked with 'rewardtune data check')",
    )
    add_threads_arg(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype: fp32, fp16 or bf16 (default: fp32)")
    p.add_argument(
        "--json",
        action="store_true",
        help='print only {"<reward>": {"I2>I1": a, "I3>I2": a, "I3>I1": a, "avg": a, "n": n}}',
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import find_split
    from ..rewards import load_rewards, parse_spec

    spec = parse_spec(args.reward)
    if any(w is not None for _, w in spec):
        raise UserError("--reward: eval-reward takes plain names (e.g. ict,hp,icthp), each evaluated on its own")
    for flag in ("batch_size", "num_workers", "limit"):
        if getattr(args, flag) < (1 if flag == "batch_size" else 0):
            raise UserError(
                f"--{flag.replace('_', '-')} must be {'at least 1' if flag == 'batch_size' else '0 or more'}"
            )

    find_split(args.data, args.split)  # a wrong path fails before any model loads
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    rewards = load_rewards([n for n, _ in spec], device=device, dtype=dtype, **sources_from_args(args))
    table = reward_training.evaluate_rewards(
        args.data,
        args.split,
        rewards,
        batch_size=args.batch_size,
        limit=args.limit,
        trust_pickle=args.trust_pickle,
        skip_bad=args.skip_bad,
        check_images=args.check_images,
        num_workers=args.num_workers,
        progress=not args.json,
    )
    if args.json:
        print(jsonio.dumps(table, indent=2))
    else:
        print_table(table, args.split)
    return 0


def print_table(table: dict, split: str) -> None:
    """The paper's layout: accuracy in percent per pair, their mean, and the number of triplets."""
    width = max(6, *(len(n) for n in table))
    cols = ["I2>I1", "I3>I2", "I3>I1", "avg"]
    print(f"{'reward':<{width}}  " + "  ".join(f"{c:>6}" for c in cols) + f"  {'n':>7}   ({split}, accuracy %)")
    for name, row in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{100 * row[c]:6.2f}" for c in cols) + f"  {row['n']:>7}")
