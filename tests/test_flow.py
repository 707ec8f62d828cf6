"""Flow-matching models (SD3/SD3.5, FLUX.1) in rewardtune finetune, on tiny real pipelines saved in diffusers
format (offline, CPU). References are diffusers' own pipelines, never a second copy of our code."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory):
    """Tiny SD3.5-Medium-like, FLUX.1-dev-like and FLUX.1-schnell-like pipeline directories."""
    from rewardtune.testing.flow_pipelines import save_tiny_flow_pipeline

    return {name: save_tiny_flow_pipeline(tmp_path_factory.mktemp(f"tiny_{name}"), family, variant)
            for name, family, variant in (("sd3", "sd3", ""), ("flux", "flux", ""), ("schnell", "flux", "schnell"))}


def _load(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_flow_pipelines_are_real_diffusers_pipelines(flow_models):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    sd3 = StableDiffusion3Pipeline.from_pretrained(flow_models["sd3"])
    flux = FluxPipeline.from_pretrained(flow_models["flux"])
    schnell = FluxPipeline.from_pretrained(flow_models["schnell"])
    assert sd3.vae.config.latent_channels == 16 and sd3.vae.config.shift_factor == pytest.approx(0.0609)
    assert flux.vae.config.scaling_factor == pytest.approx(0.3611) and flux.transformer.config.in_channels == 64
    assert flux.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert flux.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    assert sd3.scheduler.config.shift == 3.0
    assert any(".attn2." in n for n, _ in sd3.transformer.named_modules())  # SD3.5-Medium's dual attention
    tokens = sd3.tokenizer.convert_ids_to_tokens(sd3.tokenizer("a red apple").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "apple</w>", "<|endoftext|>"]  # CLIP's BPE
    ids = flux.tokenizer_2("a red apple").input_ids
    assert len(ids) == 4 and ids[-1] == 1  # three whole-word T5 pieces and </s>
