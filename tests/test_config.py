"""Typed configs: defaults <- recipe <- flags, strict keys with suggestions, types from annotations."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, fields

import pytest
import torch

from rewardtune import cli
from rewardtune.config import add_config_args, build_config, check_values, config_to_yaml, option, precision_dtype
from rewardtune.demo.runner import DemoConfig
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig, families
from rewardtune.reward_training import TrainRewardConfig


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


@dataclass
class Renamed:
    checkpoint_every: int = option(100, "save every N steps", min=0, aliases=("save_every",))
    keep: int = option(2, "checkpoints kept", min=1, aliases=("keep_checkpoints",))
    lr: float = option(1e-3, "learning rate", positive=True)
    ratio: float | None = option(None, "a fraction", min=0, max=1)
    mode: str = option("a", "mode", choices=["a", "b"])


def _parse_renamed(argv):
    p = argparse.ArgumentParser()
    add_config_args(p, Renamed)
    return p.parse_args(argv)


def test_deprecated_names_work_as_flags_and_recipe_keys_and_warn(tmp_path, capsys):
    cfg = build_config(Renamed, _parse_renamed(["--save-every", "7"]))
    assert cfg.checkpoint_every == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rewardtune: warning: --save-every on the command line is deprecated; use --checkpoint-every"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("save_every: 3\nkeep_checkpoints: 5\n")
    cfg = build_config(Renamed, _parse_renamed(["--keep", "4"]), config=str(recipe))
    assert (cfg.checkpoint_every, cfg.keep) == (3, 4)  # the flag still overrides the recipe's deprecated key
    err = capsys.readouterr().err
    assert f"'save_every' in '{recipe}' is deprecated; use 'checkpoint_every'" in err and "'keep_checkpoints'" in err
    assert build_config(Renamed, None, save_every=9).checkpoint_every == 9
    shown = _help(Renamed)  # the old flag is not listed on its own; the new one names it
    assert "--save-every SAVE_EVERY" not in shown and "[deprecated name: --save-every]" in shown


def test_deprecated_and_current_name_together_are_an_error(tmp_path):
    with pytest.raises(
        UserError,
        match="--save-every and --checkpoint-every both given on the command line; --save-every "
        "is the deprecated name of --checkpoint-every: keep only --checkpoint-every",
    ):
        build_config(Renamed, _parse_renamed(["--save-every", "7", "--checkpoint-every", "8"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("save_every: 3\ncheckpoint_every: 4\n")
    with pytest.raises(UserError, match="'save_every' and 'checkpoint_every' both given in"):
        build_config(Renamed, None, config=str(recipe))


def _help(cls) -> str:
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return " ".join(p.format_help().split())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"checkpoint_every": -1}, "--checkpoint-every must be 0 or more, got -1"),
        ({"keep": 0}, "--keep must be at least 1, got 0"),
        ({"lr": 0.0}, "--lr must be positive, got 0.0"),
        ({"ratio": 1.5}, r"--ratio must be in \[0, 1\], got 1.5"),
        ({"mode": "c"}, "--mode 'c' is not one of a, b"),
    ],
)
def test_declared_ranges_and_choices_are_checked_in_one_place(values, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        build_config(Renamed, None, **values)
    bad = Renamed(**values)
    with pytest.raises(UserError, match=message):
        check_values(bad)
    check_values(Renamed(ratio=0.0, checkpoint_every=0))  # the bounds themselves are allowed


def test_config_ranges_keep_their_messages():
    with pytest.raises(UserError, match="^--lora-rank must be at least 1, got 0$"):
        FinetuneConfig(output="o", lora_rank=0).validate()
    with pytest.raises(UserError, match="^train-reward: --checkpoints-keep must be at least 1, got 0$"):
        TrainRewardConfig(data="d", output="o", checkpoints_keep=0).validate()
    with pytest.raises(UserError, match="^demo: --k must be at least 1, got 0$"):
        DemoConfig(k=0).validate()
    with pytest.raises(UserError, match="^--k 3 is more than --sample-steps 2"):  # cross-field checks stay
        FinetuneConfig(output="o", k=3, sample_steps=2).validate()


def test_demo_fields_come_from_the_finetune_config():
    """The demo's fine-tuning options share FinetuneConfig's help, choices and ranges, with its own defaults."""

    ft = {f.name: f for f in fields(FinetuneConfig)}
    demo = {f.name: f for f in fields(DemoConfig)}
    shared = set(ft) & set(demo)
    assert {"lr", "lora_rank", "k", "sample_steps", "lr_schedule", "eval_every", "steps"} <= shared
    for name in shared:
        for key in ("choices", "min", "max", "positive"):
            assert demo[name].metadata.get(key) == ft[name].metadata.get(key), (name, key)
    assert demo["lora_rank"].metadata["help"] == ft["lora_rank"].metadata["help"]
    assert (DemoConfig().k, DemoConfig().sample_steps, DemoConfig().lr) == (6, 6, 1e-3)


def test_precision_names_map_to_one_dtype_table():
    assert [precision_dtype(n) for n in ("no", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert precision_dtype("fp32") is precision_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision_dtype("fp8")


def test_bitsandbytes_cpu_kernel_notice_is_dropped_unless_the_base_is_quantized(caplog):
    """bitsandbytes' import-time notice about an optional CPU 4-bit kernel printed on every command where peft or
    diffusers import it; the CLI drops that one message (other bitsandbytes warnings stay) except when the
    command quantizes the base, the one case the kernel is for."""
    log = logging.getLogger(cli.BNB_CPU_KERNEL_LOGGER)
    saved = list(log.filters)
    # an earlier command run in this process (cli.main in another test) may have added ours already
    log.filters[:] = [f for f in saved if not isinstance(f, cli._DropNotice)]
    before = len(log.filters)
    notice = cli.BNB_CPU_KERNEL_NOTICE + ": %s. Please make sure you already `pip install kernels`"
    try:
        for _ in range(2):  # a second command in one process adds no second filter
            cli._quiet_libraries(argparse.Namespace(command="demo"))
        assert len(log.filters) == before + 1
        with caplog.at_level(logging.WARNING):
            log.warning(notice, "No module named 'kernels'")
            log.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
        caplog.clear()
        cli._quiet_libraries(argparse.Namespace(command="finetune", quantize_base="nf4"))
        with caplog.at_level(logging.WARNING):
            log.warning(notice, "No module named 'kernels'")
        assert [r.getMessage()[: len(cli.BNB_CPU_KERNEL_NOTICE)] for r in caplog.records] == [
            cli.BNB_CPU_KERNEL_NOTICE
        ]
    finally:
        log.filters[:] = saved


def test_the_model_help_names_every_alias_the_families_declare():
    """``--model``'s help is torch-free text (``--help`` loads no family module); it names each alias of the
    registry, in the families' order, so a new family's aliases cannot be left out of it."""
    text = next(f for f in fields(FinetuneConfig) if f.name == "model").metadata["help"]
    named = re.findall(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", text.split(":", 1)[1].split(", a diffusers")[0])
    assert [n for n in named if n not in ("alias", "or")] == list(families.aliases())
