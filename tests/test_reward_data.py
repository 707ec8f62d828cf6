"""Triplet data: the published pickle layout (only behind --trust-pickle), Parquet, JSONL, conversion,
and one report per bad data set."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from rewardtune.cli import main
from rewardtune.data import COLUMNS, TripletDataset, collate, convert_pickles, find_split, load_triplets
from rewardtune.data.synthetic import make_pick_high
from rewardtune.errors import UserError
from rewardtune.images import load_image
from rewardtune.rewards.clip_tower import ClipPreprocess


@pytest.fixture(scope="module")
def pick_root(tmp_path_factory) -> Path:
    """A small synthetic set in every format: Pick-High/<split>.pkl, <split>.parquet and <split>.jsonl."""
    root = tmp_path_factory.mktemp("pickhigh")
    make_pick_high(root, {"train": 12, "val": 4}, size=16, formats=("pickle", "parquet", "jsonl"))
    return root


def pickle_only(src: Path, dst: Path) -> Path:
    """A copy of ``src`` holding only the published layout (no Parquet/JSONL next to it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.parquet", "*.jsonl"))
    return dst


def edited_copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of ``src`` with only train.jsonl (JSON keeps mixed types), after ``edit(frame)``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pkl", "*.jsonl", "*.parquet"))
    frame = pd.read_parquet(src / "train.parquet")
    if edit:
        frame = edit(frame)
    frame.to_json(dst / "train.jsonl", orient="records", lines=True)
    return dst


def test_formats_agree(pick_root, tmp_path):
    parquet = load_triplets(pick_root, "train")
    assert parquet.path.name == "train.parquet" and len(parquet) == 12
    (tmp_path / "j").mkdir()
    shutil.copy(pick_root / "train.jsonl", tmp_path / "j" / "train.jsonl")
    for d in ("pick_easy_img", "pick_refine_img"):
        (tmp_path / "j" / d).symlink_to(pick_root / d)
    jsonl = load_triplets(tmp_path / "j", "train")
    pkl = load_triplets(pickle_only(pick_root, tmp_path / "p"), "train", trust_pickle=True)
    assert jsonl.path.suffix == ".jsonl" and pkl.path.suffix == ".pkl"
    for other, root in ((jsonl, tmp_path / "j"), (pkl, tmp_path / "p")):
        assert other.easy_prompt == parquet.easy_prompt and other.refine_prompt == parquet.refine_prompt
        assert [[os.path.relpath(p, root) for p in row] for row in other.images] == [
            [os.path.relpath(p, pick_root) for p in row] for row in parquet.images
        ]
        assert all(Path(p).is_file() for row in other.images for p in row)
        torch.testing.assert_close(other.labels, parquet.labels)


def test_e2_comes_from_the_e2_column(pick_root):
    frame = pd.read_parquet(pick_root / "train.parquet")
    table = load_triplets(pick_root, "train")
    assert table.labels[:, 1].tolist() == pytest.approx(frame["E2"].tolist())
    assert table.labels[:, 1].tolist() != pytest.approx(frame["R1"].tolist())
    torch.testing.assert_close(
        table.labels, torch.tensor(frame[["E1", "E2", "R1", "R2"]].to_numpy(), dtype=torch.float32)
    )


def test_pickle_is_refused_without_the_flag_and_never_unpickled(pick_root, tmp_path):
    root = pickle_only(pick_root, tmp_path / "p")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(root / "Pick-High" / "val.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(UserError) as err:
        load_triplets(root, "val")
    msg = str(err.value)
    assert (
        "val.pkl" in msg
        and "run arbitrary code" in msg
        and "--trust-pickle" in msg
        and "rewardtune data convert" in msg
    )
    assert not marker.exists()
    # With the flag the published format is read with pandas, as published (which is why it needs trust).
    with pytest.raises(UserError, match="not a pandas DataFrame"):
        load_triplets(root, "val", trust_pickle=True)
    assert marker.exists()


def test_cli_refuses_pickle_with_exit_2(pick_root, tmp_path, capsys):
    root = pickle_only(pick_root, tmp_path / "p")
    assert main(["data", "check", str(root), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "Traceback" not in err
    assert main(["data", "check", str(root), "--split", "train", "--trust-pickle"]) == 0
    assert "train: 12 triplets OK" in capsys.readouterr().out


def test_convert_writes_parquet_equal_to_the_pickle(pick_root, tmp_path, capsys):
    root = pickle_only(pick_root, tmp_path / "p")
    with pytest.raises(UserError, match="--trust-pickle"):
        convert_pickles(root)
    assert main(["data", "convert", str(root), "--trust-pickle"]) == 0
    assert "train.parquet" in capsys.readouterr().out
    assert find_split(root, "train").name == "train.parquet"  # later runs never unpickle
    converted = load_triplets(root, "train")
    published = load_triplets(root / "Pick-High", "train", trust_pickle=True)
    assert converted.images == published.images and converted.easy_prompt == published.easy_prompt
    torch.testing.assert_close(converted.labels, published.labels)
    # Elsewhere, paths are written relative to the new root.
    out = tmp_path / "elsewhere"
    convert_pickles(root, out=out, splits=["val"], trust_pickle=True)
    moved = load_triplets(out, "val")
    assert [Path(p).resolve() for p in moved.images[0]] == [
        Path(p).resolve() for p in load_triplets(root, "val").images[0]
    ]


def test_missing_columns_are_one_report(pick_root, tmp_path):
    root = edited_copy(pick_root, tmp_path / "d", lambda f: f.drop(columns=["E2", "refine_image"]))
    with pytest.raises(UserError) as err:
        load_triplets(root, "train", skip_bad=True)
    assert "lacks column(s) refine_image, E2" in str(err.value) or "lacks column(s) E2, refine_image" in str(err.value)


def _edit_bad_rows(frame):
    frame["E2"] = frame["E2"].astype(object)
    frame.loc[1, "E1"] = 1.5
    frame.loc[3, "R2"] = -0.1
    frame.loc[4, "E2"] = "high"
    frame.loc[6, "easy_image_1"] = "pick_easy_img/train/nope.png"
    frame.loc[8, "refine_prompt"] = None
    return frame


def test_bad_rows_are_one_report_and_skip_bad_keeps_the_rest(pick_root, tmp_path, capsys):
    root = edited_copy(pick_root, tmp_path / "d", _edit_bad_rows)
    corrupt = root / pd.read_json(root / "train.jsonl", lines=True).loc[9, "refine_image"]
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(UserError) as err:
        load_triplets(root, "train")
    msg = str(err.value)
    assert "6 of 12 rows" in msg and "train.jsonl" in msg and "--skip-bad" in msg
    for part in (
        "row 1: E1=1.5 is outside [0,1]",
        "row 3: R2=-0.1 is outside [0,1]",
        "row 4: E2='high' is not a number",
        "row 6: easy_image_1",
        "is missing",
        "row 8: refine_prompt is empty",
    ):
        assert part in msg, part
    assert "and 1 more" in msg and "\n" not in msg  # first five named, the sixth counted
    table = load_triplets(root, "train", skip_bad=True)
    assert len(table) == 6 and table.skipped == 6 and table.rows == [0, 2, 5, 7, 10, 11]
    assert "6 of 12 rows" in capsys.readouterr().err
    # The corrupt image alone is named as such.
    root2 = edited_copy(pick_root, tmp_path / "d2")
    (root2 / pd.read_json(root2 / "train.jsonl", lines=True).loc[2, "easy_image_0"]).write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=r"1 of 12 rows .*row 2: easy_image_0 .* is unreadable or corrupt"):
        load_triplets(root2, "train")


def test_all_rows_bad_is_an_error_even_with_skip_bad(pick_root, tmp_path):
    def edit(f):
        f["E1"] = 2.0
        return f

    root = edited_copy(pick_root, tmp_path / "d", edit)
    with pytest.raises(UserError, match="12 of 12 rows.*no usable rows"):
        load_triplets(root, "train", skip_bad=True)


def test_missing_split_and_cli_report(pick_root, tmp_path, capsys):
    with pytest.raises(UserError, match="no 'test' split"):
        find_split(pick_root, "test")
    root = edited_copy(pick_root, tmp_path / "d", _edit_bad_rows)
    assert main(["data", "check", str(root), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "5 of 12 rows" in err


def test_dataset_preprocesses_like_the_reward(pick_root):
    """The training pixels are exactly what the rewards' torch preprocessing makes of the same files."""

    table = load_triplets(pick_root, "train")
    pre = ClipPreprocess(24)
    batch = collate([TripletDataset(table, {"ict": pre})[i] for i in range(2)])
    assert batch["pixels_ict"].shape == (2, 3, 3, 24, 24) and batch["labels"].shape == (2, 4)
    assert batch["easy_prompt"] == table.easy_prompt[:2]
    expected = pre(load_image(table.images[1][2])[None])[0]
    torch.testing.assert_close(batch["pixels_ict"][1, 2], expected)
    raw = TripletDataset(table)[0]
    assert len(raw["images"]) == 3 and raw["images"][0].shape == (3, 16, 16)


def test_synthetic_cli_writes_a_loadable_set(tmp_path, capsys):
    assert (
        main(["data", "synthetic", str(tmp_path / "s"), "--train", "3", "--val", "2", "--test", "2", "--size", "16"])
        == 0
    )
    assert "7 triplets" in capsys.readouterr().out
    table = load_triplets(tmp_path / "s", "test")
    assert len(table) == 2 and set(pd.read_parquet(tmp_path / "s" / "test.parquet").columns) >= set(COLUMNS)
    assert json.loads(json.dumps(table.easy_prompt))[0].startswith("a ")


def _repeat_rows(frame):
    """Rows 0-3 twice more (8 exact duplicates), and row 5 again with another refine prompt (not one)."""
    other = frame.iloc[[5]].copy()
    other["refine_prompt"] = "a different refined prompt"
    return pd.concat([frame, frame.iloc[:4], frame.iloc[:4], other], ignore_index=True)


def test_exact_duplicate_triplets_are_kept_and_noted_once(pick_root, tmp_path, capsys):
    root = edited_copy(pick_root, tmp_path / "d", _repeat_rows)
    table = load_triplets(root, "train")
    assert len(table) == 21  # reported, not dropped
    assert table.duplicates() == [(12, 0), (13, 1), (14, 2), (15, 3), (16, 0), (17, 1), (18, 2), (19, 3)]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: 8 of 21 triplets in split 'train' ('{root / 'train.jsonl'}') are exact duplicates of an "
        "earlier row (same prompts and images; first: row 12 = row 0); each copy counts again in training "
        "and accuracy, so drop them unless that is meant"
    ]
    assert load_triplets(pick_root, "train").duplicates() == [] and "note:" not in capsys.readouterr().err
    # `data check` says it once, beside its OK line.
    assert main(["data", "check", str(root), "--split", "train"]) == 0
    cap = capsys.readouterr()
    assert "train: 21 triplets OK" in cap.out and cap.err.count("are exact duplicates") == 1


def test_an_invisible_prompt_is_a_bad_row(pick_root, tmp_path):
    def edit(frame):
        frame.loc[2, "easy_prompt"] = "\u200b "  # a zero-width space: nothing a text encoder could read
        return frame

    with pytest.raises(UserError, match=r"1 of 12 rows .*row 2: easy_prompt is empty or not text"):
        load_triplets(edited_copy(pick_root, tmp_path / "d", edit), "train")
