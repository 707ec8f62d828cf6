"""``rewardtune data convert``: the published Pick-High pickles to Parquet, once, so later runs never
unpickle anything."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .triplets import COLUMNS, IMAGE_COLUMNS, image_dirs, read_frame


def pickle_splits(root: Path) -> list[str]:
    """Split names of ``<root>/Pick-High/*.pkl``."""
    return sorted(p.stem for p in (root / "Pick-High").glob("*.pkl"))


def convert_pickles(root, out=None, splits: list[str] | None = None, trust_pickle: bool = False) -> list[Path]:
    """Write ``<out>/<split>.parquet`` (default ``out`` = ``root``) from ``<root>/Pick-High/<split>.pkl``,
    with image paths rewritten relative to ``out``. Returns the files written."""
    root = Path(root).expanduser()
    out = Path(out).expanduser() if out else root
    splits = splits or pickle_splits(root)
    if not splits:
        raise UserError(f"data convert: no Pick-High/*.pkl under '{root}'; pass the root that holds Pick-High/")
    written = []
    for split in splits:
        src = root / "Pick-High" / f"{split}.pkl"
        if not src.is_file():
            raise UserError(
                f"data convert: '{src}' does not exist; splits found: {', '.join(pickle_splits(root)) or 'none'}"
            )
        frame = read_frame(src, trust_pickle).copy()
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise UserError(f"data convert: '{src}' lacks column(s) {', '.join(missing)}; is it a Pick-High split?")
        easy_dir, refine_dir = image_dirs(src, split)
        for col, base in zip(IMAGE_COLUMNS, (easy_dir, easy_dir, refine_dir)):
            frame[col] = [_relative(v, base, out) for v in frame[col].tolist()]
        written.append(_write_parquet(frame, out / f"{split}.parquet"))
    return written


def _relative(value, base: Path, out: Path):
    if not isinstance(value, str) or not value:
        return value  # left for validation to report
    p = Path(value)
    return os.path.relpath(p if p.is_absolute() else base / p, out)


def _write_parquet(frame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.reset_index(drop=True).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path
