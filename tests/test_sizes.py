"""``--resolution HEIGHTxWIDTH``: non-square sizes through the config, the trainer and its sampler (on a tiny SDXL,
whose conditioning also carries the size), against diffusers' own pipeline; square sizes read and save as before."""

from __future__ import annotations

import pytest
import torch
import yaml

from rewardtune.cli import main
from rewardtune.config import build_config, config_to_yaml
from rewardtune.errors import UserError
from rewardtune.finetune import FinetuneConfig, Trainer
from rewardtune.sizes import hw, parse_resolution


def test_resolution_reads_one_size_or_height_by_width():
    assert parse_resolution("480x832") == "480x832" and hw("480x832") == (480, 832)
    assert parse_resolution(" 704X1280 ") == "704x1280" and hw(704) == (704, 704)
    assert parse_resolution("512x512") == 512 and parse_resolution("512") == 512 and parse_resolution(0) == 0
    for bad in ("480x", "x832", "480*832", "1.5", True):
        with pytest.raises(UserError, match="--resolution: give one size"):
            parse_resolution(bad)


def test_config_yaml_keeps_squares_as_numbers_and_round_trips_a_non_square_size(tmp_path):
    square = build_config(FinetuneConfig, None, output="o", resolution=512)
    assert "\nresolution: 512\n" in config_to_yaml(square)
    wide = build_config(FinetuneConfig, None, output="o", resolution="480x832")
    text = config_to_yaml(wide)
    assert "\nresolution: 480x832\n" in text and yaml.safe_load(text)["resolution"] == "480x832"
    (tmp_path / "c.yaml").write_text(text)
    assert build_config(FinetuneConfig, None, config=str(tmp_path / "c.yaml")) == wide
    with pytest.raises(UserError, match="--resolution must be a positive multiple of 8 .* got 480x830"):
        build_config(FinetuneConfig, None, output="o", resolution="480x830")


@pytest.mark.parametrize("value", ["32by48", "32x44"])
def test_a_bad_size_on_the_command_line_is_one_line(value, tmp_path, capsys):
    rc = main(["finetune", "--model", "sd15", "--output", str(tmp_path / "o"), "--resolution", value])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rewardtune finetune: error: ") and "--resolution" in last and value in last
    assert not (tmp_path / "o").exists()


def test_sdxl_at_a_non_square_size_is_the_pipelines(sdxl_model, tmp_path, tiny_cfg, brightness):
    """At 32x48 the latents are 4x6, SDXL's size conditioning says (32, 48), and ``generate`` (eta 1) gives the
    images of ``StableDiffusionXLPipeline(height=32, width=48)`` from the same seed."""
    trainer = Trainer(tiny_cfg(sdxl_model, tmp_path, resolution="32x48", batch_size=1, eta=1.0), reward=brightness())
    assert trainer.latent_shape == (4, 4, 6)
    assert trainer.encode(["a cat"]).added["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    prompts = ["a red apple", "a cat"]
    ours = trainer.generate(prompts, seed=4)
    ref = trainer.pipe(
        prompts,
        num_inference_steps=3,
        height=32,
        width=48,
        guidance_scale=3.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
    ).images
    assert ours.shape == ref.shape == (2, 3, 32, 48)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
