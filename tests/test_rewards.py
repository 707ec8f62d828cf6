"""ICT, HP and ICT-HP load from the released layouts and score as the released scoring code does: CLIPModel with
the checkpoint laid over the backbone, CLIPProcessor, and the released MLP written out here (not rewardtune's
HPHead). Exact on 224x224 images; on resized ones (every fine-tuning image) within the tolerance stated below."""

from __future__ import annotations

import os
import shutil

import huggingface_hub.constants as hub
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from rewardtune.errors import OfflineError, UserError
from rewardtune.rewards import load_reward, load_rewards

# 224x224 inputs: the same arithmetic on the same pixels; only float32 summation order differs (measured: HP
# 1e-7, ICT 1e-8).
EXACT = dict(atol=1e-5, rtol=0)
# Resized inputs: rewardtune resizes float pixels in torch (bicubic, antialiased) and never rounds; CLIPProcessor
# resizes the uint8 image in two passes (PIL's way), rounding each to 0..255 and so clipping bicubic overshoot.
# Measured on the fixture's random-pixel images (the hardest case for resampling) against CLIPProcessor (its
# torchvision backend under transformers 5) and its PIL backend (what the released code ran under transformers 4):
# mean differences of 0.35 (300x200) and 0.24 (512x512) uint8 levels (rounding alone gives 0.25), 99th percentiles
# 2.8 and 0.75 levels, the rest where PIL clipped an overshoot; bilinear instead of bicubic, no antialiasing or a
# crop one pixel off give means of 3.4-49 levels and fail. In scores: HP differs by 6.5e-4 and 9.4e-5, ICT by 1.9e-6
# and 3.7e-5 (other random images: up to 1.3e-3 and 5.5e-5); the score tolerances leave ~3x over the worst seen,
# and the fixture's scores spread 38x (HP) and 240x (ICT) beyond them (asserted).
PIXEL_MEAN_LEVELS, PIXEL_P99_LEVELS = 0.5, 4.0
RESIZED_HP = dict(atol=4e-3, rtol=0)
RESIZED_ICT = dict(atol=2e-4, rtol=0)
PROMPTS = [
    "a red cube on a wooden table",
    "a photo of a cat",
    "blue sky over mountains, highly detailed",
    "two green apples",
    "a lighthouse at night",
]


class ReleasedMLP(nn.Module):
    """The released HP scorer as its code defines it: ``layers`` = Linear(d, 1024), Dropout(0.2), Linear(1024, 128),
    Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)."""

    def __init__(self, input_size: int = 1024):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def _pil(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def _tensor(path):
    """One image as rewardtune's rewards take it: (1, 3, H, W) floats in [0, 1]."""
    return torch.from_numpy(np.array(_pil([path])[0])).permute(2, 0, 1).float()[None] / 255


def _reference_clip(backbone, ckpt_state):
    """The released scoring code's way: CLIPModel from the backbone, state dict laid over, CLIPProcessor."""

    model = CLIPModel.from_pretrained(backbone).eval()
    model.load_state_dict(ckpt_state, strict=False)
    return model, CLIPProcessor.from_pretrained(backbone)


def _emb(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _released_ict(backbone, ict_dir, paths, prompts):
    model, proc = _reference_clip(backbone, torch.load(ict_dir / "pytorch_model.bin", weights_only=True))
    scores = []
    for path, prompt in zip(paths, prompts, strict=True):  # one image at a time, as sizes differ
        inputs = proc(text=[prompt], images=_pil([path]), return_tensors="pt", padding="max_length", max_length=77)
        with torch.no_grad():
            t = _emb(model.get_text_features(input_ids=inputs["input_ids"]))
            i = _emb(model.get_image_features(pixel_values=inputs["pixel_values"]))
        scores.append(torch.nn.functional.cosine_similarity(t, i, dim=-1))
    return torch.cat(scores)


def _released_hp(backbone, hp_dir, paths):
    model, proc = _reference_clip(
        backbone, torch.load(hp_dir / "hp_backbone" / "pytorch_model.bin", weights_only=True)
    )
    head = ReleasedMLP(1024).eval()
    head.load_state_dict(
        torch.load(hp_dir / "hp_scorer" / "mlp_pytorch_model.bin", weights_only=True)
    )  # strict: the names
    scores = []
    for path in paths:
        pixels = proc(images=_pil([path]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            scores.append(torch.sigmoid(head(_emb(model.get_image_features(pixel_values=pixels)))).squeeze(-1))
    return torch.cat(scores)


def _ours(reward, paths, prompts):
    with torch.no_grad():
        return torch.cat([reward(_tensor(p), [q]) for p, q in zip(paths, prompts, strict=True)])


def test_ict_matches_the_released_computation(tiny_backbone, released_ict, sample_images, large_image):
    reward = load_reward("ict", ict=str(released_ict), backbone=str(tiny_backbone))
    paths = [*sample_images, large_image]
    expected = _released_ict(tiny_backbone, released_ict, paths, PROMPTS)
    got = _ours(reward, paths, PROMPTS)
    torch.testing.assert_close(got[:3], expected[:3], **EXACT)  # 224x224
    torch.testing.assert_close(got[3:], expected[3:], **RESIZED_ICT)  # 300x200, 512x512
    assert float(expected.max() - expected.min()) > 50 * RESIZED_ICT["atol"]
    # the checkpoint changed the model: the plain backbone scores differently
    plain = load_reward("ict", ict=str(tiny_backbone), backbone=str(tiny_backbone))
    assert (_ours(plain, sample_images[:3], PROMPTS[:3]) - got[:3]).abs().max() > 100 * EXACT["atol"]


def test_hp_matches_the_released_computation(tiny_backbone, released_hp, sample_images, large_image):
    scorer = torch.load(released_hp / "hp_scorer" / "mlp_pytorch_model.bin", weights_only=True)
    assert sorted(scorer) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    reward = load_reward("hp", hp=str(released_hp), backbone=str(tiny_backbone))
    paths = [*sample_images, large_image]
    expected = _released_hp(tiny_backbone, released_hp, paths)
    got = _ours(reward, paths, PROMPTS)
    torch.testing.assert_close(got[:3], expected[:3], **EXACT)
    torch.testing.assert_close(got[3:], expected[3:], **RESIZED_HP)
    # the images' scores spread far beyond both tolerances: a wrong head or backbone could not pass unnoticed
    spread = float(expected.max() - expected.min())
    assert spread > 1000 * EXACT["atol"] and spread > 25 * RESIZED_HP["atol"], spread


def test_resize_path_matches_clipprocessor_pixels(tiny_backbone, released_hp, sample_images, large_image):
    """Fine-tuning images always take the resize path: our preprocessing of the 300x200 and 512x512 images against
    CLIPProcessor's pixel values (and its PIL backend's, where transformers has one), in uint8 levels."""

    reward = load_reward("hp", hp=str(released_hp), backbone=str(tiny_backbone))
    processors = [CLIPProcessor.from_pretrained(tiny_backbone).image_processor]
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: PLC0415  (transformers 5 only)
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        pass
    else:
        processors.append(CLIPImageProcessorPil.from_pretrained(tiny_backbone))
    level = 1 / 255 / reward.tower.preprocess.std  # one uint8 step in normalised units, per channel
    for path in [*sample_images, large_image]:
        with torch.no_grad():
            ours = reward.tower.preprocess(_tensor(path))
        for proc in processors:
            ref = proc(images=_pil([path]), return_tensors="pt")["pixel_values"]
            levels = ((ours - ref).abs() / level).flatten()
            if Image.open(path).size == (224, 224):
                assert levels.max() < 1e-3, (path.name, type(proc).__name__)
            else:
                assert levels.mean() < PIXEL_MEAN_LEVELS, (path.name, type(proc).__name__, float(levels.mean()))
                assert levels.quantile(0.99) < PIXEL_P99_LEVELS, (path.name, type(proc).__name__)


def test_icthp_and_mixes_match_the_released_scores(tiny_backbone, released_ict, released_hp, sample_images):
    """ICT-HP is rewardtune's single-image combination ICT x HP and a mix is the weighted sum, each against the
    released computations of ICT and HP; the models are loaded once and shared."""
    kw = dict(ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    r = load_rewards(["ict", "hp", "icthp"], **kw)
    assert r["icthp"].ict is r["ict"] and r["icthp"].hp is r["hp"]
    paths, prompts = sample_images[:3], PROMPTS[:3]
    ict, hp = (
        _released_ict(tiny_backbone, released_ict, paths, prompts),
        _released_hp(tiny_backbone, released_hp, paths),
    )
    torch.testing.assert_close(_ours(r["icthp"], paths, prompts), ict * hp, **EXACT)
    torch.testing.assert_close(_ours(load_reward("ict:1.0,hp:0.5", **kw), paths, prompts), ict + 0.5 * hp, **EXACT)


@pytest.mark.parametrize("name", ["ict", "hp", "icthp"])
def test_gradients_reach_pixels(name, tiny_backbone, released_ict, released_hp, sample_images):
    reward = load_reward(name, ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    # any size: 96x130 goes through the antialiased resize and the centre crop
    x = torch.rand(2, 3, 96, 130, requires_grad=True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batch_order_invariance(tiny_backbone, released_ict, released_hp, sample_images):
    reward = load_reward("icthp", ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    x = torch.cat([_tensor(p) for p in sample_images[:3]])
    perm = [2, 0, 1]
    with torch.no_grad():
        a = reward(x, PROMPTS[:3])
        b = reward(x[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(a[perm], b, atol=1e-5, rtol=1e-5)


def test_safetensors_layout_and_self_contained_dir(tiny_backbone, released_ict, tmp_path, sample_images):
    """Our own ICT output is a full HF CLIP dir with safetensors: usable without --backbone."""

    d = tmp_path / "ict_ours"
    model = CLIPModel.from_pretrained(tiny_backbone)
    model.load_state_dict(torch.load(released_ict / "pytorch_model.bin", weights_only=True), strict=False)
    model.save_pretrained(d)
    for f in (
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ):
        shutil.copy(tiny_backbone / f, d / f)
    x = torch.cat([_tensor(p) for p in sample_images[:3]])
    with torch.no_grad():
        a = load_reward("ict", ict=str(d))(x, PROMPTS[:3])
        b = load_reward("ict", ict=str(released_ict), backbone=str(tiny_backbone))(x, PROMPTS[:3])
    torch.testing.assert_close(a, b, **EXACT)


def test_checkpoint_matching_no_keys_is_an_error(tiny_backbone, tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="none of its 1 keys"):
        load_reward("ict", ict=str(tmp_path), backbone=str(tiny_backbone))


def test_missing_files_are_named(tiny_backbone, tmp_path):
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_reward("ict", ict=str(tmp_path), backbone=str(tiny_backbone))
    (tmp_path / "hp_backbone").mkdir()
    with pytest.raises(UserError, match=r"hp_backbone.*pytorch_model.bin"):
        load_reward("hp", hp=str(tmp_path), backbone=str(tiny_backbone))


def test_unknown_reward_lists_valid_names():
    with pytest.raises(UserError, match="did you mean 'icthp'.*valid rewards: ict, hp, icthp"):
        load_reward("ichtp")


def test_hub_is_offline_and_its_cache_is_the_sessions_empty_one(hf_home):
    """conftest makes the hub hermetic before huggingface_hub is imported: no test reads a developer's cache or
    reaches the hub, whatever the shell sets."""

    assert hub.HF_HUB_OFFLINE and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.path.realpath(hub.HF_HOME) == os.path.realpath(hf_home)
    assert os.path.realpath(hub.HF_HUB_CACHE).startswith(os.path.realpath(hf_home))
    assert not any(p.name.startswith("models--") for p in hf_home.rglob("*"))


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(OfflineError, match="not in the local cache.*local directory"):
        load_reward("ict", ict="8y/ICT")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['REWARDTUNE_EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_not_executed(tiny_backbone, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("REWARDTUNE_EVIL_MARKER", str(marker))
    ckpt = tmp_path / "ict"
    ckpt.mkdir()
    torch.save({"text_projection.weight": _Evil()}, ckpt / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused to load"):
        load_reward("ict", ict=str(ckpt), backbone=str(tiny_backbone))
    assert not marker.exists()
