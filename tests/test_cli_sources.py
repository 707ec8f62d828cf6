"""A command that cannot find several of its inputs names all of them in one error, before any model loads
(the hub is offline and its cache empty here: every hub default is missing)."""

from __future__ import annotations

from rewardtune.testing.cli import one_line_error, run_cli


def test_score_names_every_missing_reward_source_at_once(sample_images, tiny_backbone, tmp_path):
    line = one_line_error(run_cli("score", sample_images[0], "--prompt", "a cat"), "score")
    assert "3 problems" in line
    for flag, source in (("--ict", "8y/ICT"), ("--hp", "8y/HP"), ("--backbone", "laion/CLIP-ViT-H-14")):
        assert flag in line and source in line, (flag, line)
    assert line.count("download it where the hub is reachable") == 1  # the shared advice, said once
    # a local directory that is not there, beside a hub default that is not cached; the given backbone is fine
    line = one_line_error(
        run_cli(
            "score", sample_images[0], "--prompt", "a cat", "--reward", "ict,clip",
            "--ict", tmp_path / "no-ict", "--backbone", tiny_backbone,
        ),
        "score",
    )  # fmt: skip
    assert "2 problems" in line and "no-ict' does not exist" in line and "--clip" in line
    assert "--backbone" not in line and "--hp" not in line


def test_train_reward_names_the_data_the_backbone_and_the_ict_model_at_once(tmp_path):
    line = one_line_error(
        run_cli(
            "train-reward", "--stage", "hp", "--data", tmp_path / "no-data", "--ict", tmp_path / "no-ict",
            "--output", tmp_path / "out",
        ),
        "train-reward",
    )  # fmt: skip
    assert "3 problems" in line
    assert "no-data" in line and "--backbone" in line and "no-ict" in line
