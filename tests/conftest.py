"""Shared fixtures: tiny real CLIP models and SD/SDXL pipelines saved the way users' files look, and the
small pieces the fine-tuning tests share (a reward any generator can move, a tiny run config). Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rewardtune.finetune import FinetuneConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """An HF CLIP directory (config, weights, the real CLIP tokenizer, preprocessor), projection dim 1024."""
    from rewardtune.testing import save_tiny_clip

    d = tmp_path_factory.mktemp("backbone")
    save_tiny_clip(d, seed=0, projection_dim=1024)
    return d


@pytest.fixture(scope="session")
def released_ict(tiny_backbone, tmp_path_factory) -> Path:
    """ICT as released: <dir>/pytorch_model.bin, a CLIPModel state dict laid over the backbone."""
    from transformers import CLIPModel

    from rewardtune.testing import perturbed_state_dict

    d = tmp_path_factory.mktemp("ict")
    base = CLIPModel.from_pretrained(tiny_backbone)
    torch.save(perturbed_state_dict(base, seed=1), d / "pytorch_model.bin")
    return d


@pytest.fixture(scope="session")
def released_hp(tiny_backbone, tmp_path_factory) -> Path:
    """HP as released: hp_backbone/pytorch_model.bin and hp_scorer/mlp_pytorch_model.bin."""
    from transformers import CLIPModel

    from rewardtune.rewards.icthp import HPHead
    from rewardtune.testing import perturbed_state_dict

    d = tmp_path_factory.mktemp("hp")
    (d / "hp_backbone").mkdir()
    (d / "hp_scorer").mkdir()
    base = CLIPModel.from_pretrained(tiny_backbone)
    torch.save(perturbed_state_dict(base, seed=2), d / "hp_backbone" / "pytorch_model.bin")
    torch.manual_seed(3)
    head = HPHead(1024)
    for p in head.parameters():  # larger weights than the init so scores spread visibly
        torch.nn.init.normal_(p, std=0.05)
    torch.save(head.state_dict(), d / "hp_scorer" / "mlp_pytorch_model.bin")
    return d


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> list[Path]:
    """Three 224x224 PNGs (so CLIP's resize is the identity) and one 300x200 PNG."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(224, 224), (224, 224), (224, 224), (200, 300)]):
        arr = (rng.random((h, w, 3)) * 255).astype("uint8")
        arr[: h // 2, :, i % 3] = 255
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory) -> Path:
    """A tiny SD 1.x pipeline directory (diffusers format, the real CLIP tokenizer)."""
    from rewardtune.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline directory (two text encoders, text_time conditioning)."""
    from rewardtune.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl", seed=0)


class Brightness(torch.nn.Module):
    """Mean pixel value (times ``sign``): a reward any generator can move."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def forward(self, images, prompts):
        return self.sign * images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="session")
def brightness():
    """``brightness(sign=1.0)``: a differentiable reward, the mean pixel value times ``sign``."""
    return Brightness


@pytest.fixture(scope="session")
def tiny_cfg():
    """``tiny_cfg(model, output, **overrides)``: a FinetuneConfig that trains a tiny pipeline in seconds."""

    def make(model, output, **kw) -> FinetuneConfig:
        base = dict(model=str(model), prompts="builtin:simple", output=str(output), method="draft-k", k=2, steps=2,
                    batch_size=2, lr=3e-2, lora_rank=4, lora_alpha=4.0, resolution=32, sample_steps=3, guidance_scale=3.0,
                    eval_every=0, eval_size=4, checkpoint_every=0,
                    gradient_checkpointing=False)  # checkpointing: see the tests that turn it on
        base.update(kw)
        return FinetuneConfig(**base)

    return make
