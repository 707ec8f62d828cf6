"""Shared fixtures: tiny real CLIP models saved the way users' files look. Nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
