"""Preference triplets on disk: Pick-High as published (pickle) and the same columns as Parquet/JSONL.

A row is one triplet: ``easy_prompt``, ``refine_prompt``, ``easy_image_0`` (I1, the Pick-a-Pic loser),
``easy_image_1`` (I2, the winner), ``refine_image`` (I3, made from the refined prompt) and the ICT
labels ``E1, E2, R1, R2`` in [0, 1].

Layouts under a data root:
- ``<root>/<split>.parquet`` or ``<root>/<split>.jsonl``: image paths relative to ``<root>`` (or absolute);
- ``<root>/Pick-High/<split>.pkl`` (published): image names under ``<root>/pick_easy_img/<split>/``
  and ``<root>/pick_refine_img/<split>/``. A pickle can run code when loaded, so it is read only with
  ``trust_pickle=True``.

Unlike the published loader (which fills E2 from the R1 column), E2 comes from the E2 column.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..images import load_image, opened
from ..prompt_checks import is_blank

PROMPT_COLUMNS = ["easy_prompt", "refine_prompt"]
IMAGE_COLUMNS = ["easy_image_0", "easy_image_1", "refine_image"]
LABEL_COLUMNS = ["E1", "E2", "R1", "R2"]
COLUMNS = PROMPT_COLUMNS + IMAGE_COLUMNS + LABEL_COLUMNS
SHOW_BAD = 5  # rows named in a bad-data report


def find_split(root: str | os.PathLike, split: str) -> Path:
    """The file holding ``split`` under ``root``: Parquet, then JSONL, then the published pickle."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data: '{root}' is not a directory; pass the data root (holding <split>.parquet or Pick-High/)"
        )
    for cand in (root / f"{split}.parquet", root / f"{split}.jsonl", root / "Pick-High" / f"{split}.pkl"):
        if cand.is_file():
            return cand
    if root.name == "Pick-High" and (root / f"{split}.pkl").is_file():
        return root / f"{split}.pkl"
    raise UserError(
        f"data: no '{split}' split under '{root}'; expected {split}.parquet, {split}.jsonl or "
        f"Pick-High/{split}.pkl there"
    )


def pickle_refusal(path: Path) -> UserError:
    return UserError(
        f"data: '{path}' is a pickle, and loading a pickle can run arbitrary code; pass --trust-pickle if you "
        f"trust where it came from, or convert it once with 'rewardtune data convert {_pickle_root(path)} "
        f"--trust-pickle' and use the Parquet files it writes"
    )


def _pickle_root(path: Path) -> Path:
    """The data root of a published ``<root>/Pick-High/<split>.pkl``."""
    return path.parent.parent if path.parent.name == "Pick-High" else path.parent


def read_frame(path: Path, trust_pickle: bool = False):
    """The raw table of ``path`` as a pandas DataFrame."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
    except Exception as exc:
        raise UserError(
            f"data: '{path}' is not a readable {path.suffix[1:]} file ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if path.suffix != ".pkl":
        raise UserError(f"data: '{path}' has an unknown format; use .parquet, .jsonl or the published .pkl")
    if not trust_pickle:
        raise pickle_refusal(path)
    try:
        frame = pd.read_pickle(path)  # the published format; only ever reached with --trust-pickle
    except Exception as exc:
        raise UserError(
            f"data: '{path}' is not a readable pickled DataFrame ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"data: '{path}' holds a {type(frame).__name__}, not a pandas DataFrame of triplets")
    return frame


def image_dirs(path: Path, split: str) -> tuple[Path, Path]:
    """Where image paths of ``path`` are relative to: (easy images, refined images)."""
    if path.suffix == ".pkl":
        root = _pickle_root(path)
        return root / "pick_easy_img" / split, root / "pick_refine_img" / split
    return path.parent, path.parent


@dataclass
class TripletTable:
    """Validated triplets: prompts, absolute image paths I1, I2, I3, labels; ``rows`` are source row numbers."""

    path: Path
    easy_prompt: list[str]
    refine_prompt: list[str]
    images: list[tuple[str, str, str]]
    labels: torch.Tensor  # (N, 4): E1, E2, R1, R2
    rows: list[int]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def duplicates(self) -> list[tuple[int, int]]:
        """(row, earlier row) for each triplet with the same two prompts and three images as an earlier one."""
        first: dict[tuple, int] = {}
        out = []
        for i, key in enumerate(zip(self.easy_prompt, self.refine_prompt, self.images)):
            if key in first:
                out.append((self.rows[i], self.rows[first[key]]))
            else:
                first[key] = i
        return out

    def head(self, n: int) -> TripletTable:
        n = min(n, len(self))
        return TripletTable(
            self.path,
            self.easy_prompt[:n],
            self.refine_prompt[:n],
            self.images[:n],
            self.labels[:n],
            self.rows[:n],
            self.skipped,
        )


def load_triplets(
    root,
    split: str,
    trust_pickle: bool = False,
    skip_bad: bool = False,
    check_images: bool = True,
    limit: int | None = None,
) -> TripletTable:
    """Read and validate ``split`` under ``root``. Bad rows raise one report; ``skip_bad`` drops them instead.

    ``limit`` keeps the first N rows (before validation, so a huge split is not checked in full). Exact
    duplicate triplets are kept, and counted in a note on stderr.
    """
    path = find_split(root, split)
    frame = read_frame(path, trust_pickle)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns)) or "none"
        raise UserError(
            f"data: '{path}' lacks column(s) {', '.join(missing)} (it has: {have}); "
            f"triplet data needs {', '.join(COLUMNS)}"
        )
    if limit:
        frame = frame.iloc[:limit]
    if len(frame) == 0:
        raise UserError(f"data: '{path}' has no rows")
    easy_dir, refine_dir = image_dirs(path, split)
    paths = [
        [_abspath(v, d) for v in frame[c].tolist()] for c, d in zip(IMAGE_COLUMNS, (easy_dir, easy_dir, refine_dir))
    ]
    problems = _row_problems(frame, paths, check_images)
    bad = sorted(problems)
    if bad and not skip_bad:
        raise UserError(
            bad_report(path, problems, len(frame))
            + f"; fix or drop them, or pass --skip-bad to use the other {len(frame) - len(bad)}"
        )
    if bad:
        if len(bad) == len(frame):
            raise UserError(bad_report(path, problems, len(frame)) + "; no usable rows are left")
        print(f"warning: {bad_report(path, problems, len(frame))}; skipping them (--skip-bad)", file=sys.stderr)
    keep = [i for i in range(len(frame)) if i not in problems]
    labels = torch.tensor(frame[LABEL_COLUMNS].apply(_to_float).to_numpy(dtype="float32")[keep]).reshape(-1, 4)
    table = TripletTable(
        path=path,
        easy_prompt=[str(frame["easy_prompt"].iloc[i]) for i in keep],
        refine_prompt=[str(frame["refine_prompt"].iloc[i]) for i in keep],
        images=[(paths[0][i], paths[1][i], paths[2][i]) for i in keep],
        labels=labels,
        rows=keep,
        skipped=len(bad),
    )
    dups = table.duplicates()
    if dups:
        row, earlier = dups[0]
        print(
            f"note: {len(dups)} of {len(table)} triplets in split '{split}' ('{path}') are exact duplicates of an "
            f"earlier row (same prompts and images; first: row {row} = row {earlier}); each copy counts again in "
            f"training and accuracy, so drop them unless that is meant",
            file=sys.stderr,
        )
    return table


def bad_report(path: Path, problems: dict[int, str], total: int) -> str:
    """One line: how many rows are bad and what is wrong with the first few."""
    bad = sorted(problems)
    first = "; ".join(f"row {i}: {problems[i]}" for i in bad[:SHOW_BAD])
    more = f"; and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
    return f"data: {len(bad)} of {total} rows of '{path}' are bad ({first}{more})"


def _abspath(value, base: Path) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _to_float(column):
    import pandas as pd

    return pd.to_numeric(column, errors="coerce")


def _row_problems(frame, paths: list[list[str | None]], check_images: bool) -> dict[int, str]:
    """{row number: first problem} over prompts, labels and images."""
    problems: dict[int, str] = {}

    def note(i: int, text: str) -> None:
        problems.setdefault(i, text)

    for col in PROMPT_COLUMNS:
        for i, v in enumerate(frame[col].tolist()):
            if is_blank(v):
                note(i, f"{col} is empty or not text ({v!r})")
    for col in LABEL_COLUMNS:
        raw, values = frame[col].tolist(), _to_float(frame[col]).tolist()
        for i, (r, v) in enumerate(zip(raw, values)):
            if v is None or not math.isfinite(v) or isinstance(r, bool):
                note(i, f"{col}={r!r} is not a number")
            elif not 0.0 <= v <= 1.0:
                note(i, f"{col}={r!r} is outside [0,1]")
    for col, col_paths in zip(IMAGE_COLUMNS, paths):
        for i, p in enumerate(col_paths):
            if p is None:
                note(i, f"{col} is empty")
    if check_images:
        unique = sorted({p for col_paths in paths for p in col_paths if p is not None})
        with ThreadPoolExecutor(max_workers=8) as pool:
            broken = {p: why for p, why in zip(unique, pool.map(_image_problem, unique)) if why}
        for col, col_paths in zip(IMAGE_COLUMNS, paths):
            for i, p in enumerate(col_paths):
                if p in broken:
                    note(i, f"{col} '{p}' {broken[p]}")
    return problems


def _image_problem(path: str) -> str | None:
    """Why ``path`` is not a usable image, or None."""

    if not os.path.isfile(path):
        return "is missing"
    try:
        with opened(path) as im:
            im.verify()
    except UserError as exc:
        return str(exc).split("' ", 1)[-1]  # "is W x H (...), over the limit ..."
    except Exception as exc:
        return f"is unreadable or corrupt ({type(exc).__name__})"
    return None


class TripletDataset(Dataset):
    """Triplets for torch: prompts, labels (4,), and per preprocessing key the three images as
    ``pixels_<key>`` (3, 3, S, S); without preprocessing, ``images``: the three [0,1] tensors."""

    def __init__(self, table: TripletTable, preprocess: dict | None = None):
        self.table = table
        self.preprocess = dict(preprocess or {})

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        t = self.table
        images = [load_image(p) for p in t.images[i]]
        item = {
            "easy_prompt": t.easy_prompt[i],
            "refine_prompt": t.refine_prompt[i],
            "labels": t.labels[i],
            "index": i,
        }
        if not self.preprocess:
            item["images"] = images
        with torch.no_grad():
            for key, pre in self.preprocess.items():
                item[f"pixels_{key}"] = torch.cat([pre(im[None]) for im in images])
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings and raw image lists as lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "index":
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
