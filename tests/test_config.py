"""Typed configs: defaults <- recipe <- flags, strict keys with suggestions, types from annotations."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from rewardtune.config import add_config_args, build_config, config_to_yaml, option, precision_dtype
from rewardtune.errors import UserError


@dataclass
class Cfg:
    lr: float = option(1e-4, "learning rate")
    steps: int = option(10, "steps")
    name: str | None = option(None, "a name")
    scale: float | None = option(None, "optional float")
    ckpt: bool = option(True, "checkpointing")
    tags: list = option([], "tags")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Cfg)
    return p.parse_args(argv)


def test_precedence_defaults_recipe_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nsteps: 3\n")
    cfg = build_config(Cfg, _parse(["--steps", "7", "--scale", "0.25", "--no-ckpt"]), config=str(recipe))
    assert (cfg.lr, cfg.steps, cfg.scale, cfg.ckpt, cfg.name) == (0.5, 7, 0.25, False, None)
    assert isinstance(cfg.scale, float)


def test_unknown_recipe_key_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nstpes: 3\nbogus: 1\n")
    with pytest.raises(UserError, match=r"'stpes' \(did you mean 'steps'\?\), 'bogus'.*valid keys: lr, steps"):
        build_config(Cfg, None, config=str(recipe))


def test_wrong_type_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: many\n")
    with pytest.raises(UserError, match="'steps' must be int"):
        build_config(Cfg, None, config=str(recipe))


def test_missing_recipe_lists_bundled():
    with pytest.raises(UserError, match="neither a file nor a bundled recipe; bundled: .*train_ict"):
        build_config(Cfg, None, config="no_such_recipe")


def test_yaml_round_trip(tmp_path):
    cfg = build_config(Cfg, None, lr=0.125, tags=["a", "b"])
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    assert build_config(Cfg, None, config=str(path)) == cfg


def test_precision_names_map_to_one_dtype_table():
    import torch

    assert [precision_dtype(n) for n in ("no", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert precision_dtype("fp32") is precision_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision_dtype("fp8")
