"""``rewardtune demo --compare`` end to end with a handful of steps: every table and the plot, and an accuracy
column that is what ``rewardtune eval-reward`` computes on the same split."""

from __future__ import annotations

import json

import pytest

from rewardtune.demo.build import MODELS_DIR
from rewardtune.demo.compare import COMPARED, LABELS, hacking_signs
from rewardtune.testing.cli import run_cli

pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / "pickscore" / "config.json").is_file(),
    reason="bundled comparison models missing; run scripts/build_demo_models.py --only baselines",
)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_demo_flags):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = run_cli(
        "demo",
        "--compare",
        "--output",
        str(out),
        *tiny_demo_flags,
        "--sample-steps",
        "4",
        "--k",
        "2",
        "--test-triplets",
        "24",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_compare_writes_every_table_and_the_plot(compared):
    out, done = compared
    result = json.loads((out / "compare.json").read_text())
    assert list(result["rewards"]) == list(COMPARED)
    oracle_before = {r["oracle_before"] for r in result["rewards"].values()}
    assert len(oracle_before) == 1  # the same base, prompts and noise for every reward
    for name, row in result["rewards"].items():
        assert row["steps"] == 2 and [e["step"] for e in row["evaluations"]] == [0, 1, 2]
        assert row["accuracy"]["n"] == 24
        for key in ("oracle", "heldout_reward", "saturation", "reward"):
            assert 0 <= abs(row[f"{key}_before"]) < 1e3 and 0 <= abs(row[f"{key}_after"]) < 1e3
        assert (out / name / "summary.json").is_file() and (out / name / "report.html").is_file()
    md = (out / "compare.md").read_text()
    html = (out / "report.html").read_text()
    for label in LABELS.values():
        assert md.count(f"| {label} |") == 2  # the outcome table and the per-attribute table
        assert html.count(f"<td>{label}</td>") == 2
    assert "signs of hacking" in md and "position right" in md
    svg = (out / "curves.svg").read_text()
    assert svg.count("<polyline") == 4 * len(COMPARED)  # four charts, every reward's curve on each
    assert html.count("<svg") == 4 and all(label in svg for label in LABELS.values())
    assert "about" in done.stdout and "s left" in done.stdout  # progress with an estimate of the time left


def test_compare_accuracy_is_eval_rewards(compared):
    out, _ = compared
    result = json.loads((out / "compare.json").read_text())
    cli = run_cli(
        "eval-reward",
        "--data",
        str(out / "test_split"),
        "--split",
        "test",
        "--reward",
        ",".join(COMPARED),
        "--ict",
        str(MODELS_DIR / "ict"),
        "--hp",
        str(MODELS_DIR / "hp"),
        "--pickscore",
        str(MODELS_DIR / "pickscore"),
        "--clip",
        str(MODELS_DIR / "clip"),
        "--num-workers",
        "0",
        "--json",
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    table = json.loads(cli.stdout)
    assert {name: row["accuracy"] for name, row in result["rewards"].items()} == table


def test_compare_refuses_to_overwrite(compared):
    out, _ = compared
    again = run_cli("demo", "--compare", "--output", str(out), "--steps", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_compare_names_a_missing_baseline(tmp_path):
    """A models directory from before the baselines part: one line naming the file and the builder's part."""
    models = tmp_path / "models"
    models.mkdir()
    for part in MODELS_DIR.iterdir():
        if part.name != "pickscore":
            (models / part.name).symlink_to(part)
    done = run_cli("demo", "--compare", "--models", str(models), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "pickscore/config.json" in done.stderr and "build_demo_models.py" in done.stderr
    assert not (tmp_path / "o").exists()
    mixed = run_cli("demo", "--compare", "--reward", "hp", "--output", str(tmp_path / "o"))
    assert mixed.returncode == 2 and "--reward" in mixed.stderr and "Traceback" not in mixed.stderr


def test_hacking_signs_read_the_ground_truth_against_the_trained_reward():
    """Each sign on a made-up before/after: the reward rising while the oracle, the held-out CLIP or one asked-for
    attribute falls (the background collapse seen in trials: 0.55 -> 0.30, chance 0.33), and saturation."""
    attrs = {"colour": 0.30, "shape": 0.58, "size": 0.73, "position": 0.56, "background": 0.55}
    honest = dict(
        reward_before=0.3,
        reward_after=0.5,
        oracle_before=0.54,
        oracle_after=0.70,
        heldout_reward_before=0.1,
        heldout_reward_after=0.3,
        saturation_before=0.15,
        saturation_after=0.18,
        attributes_before=attrs,
        attributes_after={**attrs, "colour": 0.70, "background": 0.45},
    )
    assert hacking_signs(honest) == []  # background -0.10: within the noise of 64 prompts
    collapsed = {**honest, "attributes_after": {**attrs, "colour": 0.70, "background": 0.30}, "saturation_after": 0.28}
    assert hacking_signs(collapsed) == ["background right -0.25 (chance 0.33)", "saturation up +0.13"]
    hacked = {**honest, "oracle_after": 0.49, "heldout_reward_after": 0.03}
    assert hacking_signs(hacked) == ["reward up, oracle down", "reward up, held-out CLIP down"]
    # a reward that fell was not hacked into giving up an attribute; saturation is flagged regardless
    assert hacking_signs({**collapsed, "reward_after": 0.2}) == ["saturation up +0.13"]
