"""CLIP, PickScore, HPS v2 and aesthetic rewards: tiny real models saved in the released layouts, loaded
through ``load_reward``, scored against an independent computation (the releases' own preprocessing and
model forward). Nothing downloads."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from rewardtune.clip_tokenizer import write_clip_tokenizer
from rewardtune.errors import OfflineError, UserError
from rewardtune.finetune.run import run_finetune
from rewardtune.prompt_checks import long_prompt_notes, reward_limits
from rewardtune.rewards import canonical_spec, load_reward, load_rewards
from rewardtune.sources import save_state_dict
from rewardtune.testing import save_tiny_clip, write_clip_processor

PROMPTS = ["a red cube on a wooden table", "a photo of a cat", "blue sky over mountains, highly detailed"]
AESTHETIC_PTH = "sac+logos+ava1-l14-linearMSE.pth"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# A tiny open_clip architecture in the hub's open_clip_config.json layout; an unusual mean/std shows
# that preprocessing follows the model's config.
TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.5, 0.45, 0.4], "std": [0.2, 0.25, 0.3]},
}


def _pil(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def _tensor(paths):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in _pil(paths)])


def _emb(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# ---------------------------------------------------------------- fixtures: the released layouts


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """openai/clip-vit-large-patch14 in miniature: an HF CLIP directory, projection dim 768."""

    d = tmp_path_factory.mktemp("clip")
    save_tiny_clip(d, seed=11, projection_dim=768)
    return d


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir without tokenizer files, processor dir with the tokenizer and preprocessor config)."""

    model_dir = tmp_path_factory.mktemp("pickscore")
    save_tiny_clip(model_dir, seed=12, projection_dim=64)
    model = CLIPModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.logit_scale.fill_(3.3)  # a fine-tuned temperature, not the init value
    model.save_pretrained(model_dir)
    for name in TOKENIZER_FILES + ("preprocessor_config.json",):
        (model_dir / name).unlink()
    proc_dir = tmp_path_factory.mktemp("pickscore_processor")
    write_clip_tokenizer(proc_dir)
    write_clip_processor(proc_dir, 224)
    return model_dir, proc_dir


def _tiny_open_clip(seed: int):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP["model_cfg"]).eval()
    with torch.no_grad():  # move every tensor off its init value, like trained weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hpsv2_dir(tmp_path_factory) -> Path:
    """xswu/HPSv2 layout: fp16 ``{'state_dict': ...}`` files for v2 and v2.1, plus the tiny architecture."""
    d = tmp_path_factory.mktemp("hpsv2")
    for name, seed in (("HPS_v2.1_compressed.pt", 21), ("HPS_v2_compressed.pt", 20)):
        state = {k: v.half() for k, v in _tiny_open_clip(seed).state_dict().items()}
        torch.save({"state_dict": state}, d / name)
    (d / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return d


def _aesthetic_mlp(dim: int) -> nn.Sequential:
    """The predictor's MLP as its README defines it (no activations), written out independently."""
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(31)
    mlp = _aesthetic_mlp(768)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.05)
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, d / AESTHETIC_PTH)
    return d


# ---------------------------------------------------------------- scores against independent computations


def test_clip_is_cosine_of_clip_processor_embeddings(clip_dir, sample_images):
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = proc(text=PROMPTS, images=_pil(sample_images[:3]), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
        got = load_reward("clip", clip=str(clip_dir))(_tensor(sample_images[:3]), PROMPTS)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.abs().max() <= 1 + 1e-6


def test_pickscore_is_scaled_cosine_with_processor_from_backbone(pickscore_dirs, sample_images):
    model_dir, proc_dir = pickscore_dirs
    model, proc = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(proc_dir)
    inputs = proc(text=PROMPTS, images=_pil(sample_images[:3]), return_tensors="pt", padding=True)
    with torch.no_grad():
        t = _emb(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        i = _emb(model.get_image_features(pixel_values=inputs["pixel_values"]))
        t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (t * i).sum(-1)  # PickScore's model card formula
        got = load_reward("pickscore", pickscore=str(model_dir), backbone=str(proc_dir))(
            _tensor(sample_images[:3]), PROMPTS
        )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert abs(model.logit_scale.exp().item() - np.exp(3.3)) < 1e-4


def test_pickscore_prefers_the_model_dirs_own_tokenizer(pickscore_dirs, tmp_path, sample_images):
    model_dir, proc_dir = pickscore_dirs
    full = tmp_path / "pickscore_full"
    shutil.copytree(model_dir, full)
    for name in TOKENIZER_FILES + ("preprocessor_config.json",):
        shutil.copy(proc_dir / name, full / name)
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        own = load_reward("pickscore", pickscore=str(full), backbone=str(tmp_path / "nowhere"))(x, PROMPTS)
        via_backbone = load_reward("pickscore", pickscore=str(model_dir), backbone=str(proc_dir))(x, PROMPTS)
    torch.testing.assert_close(own, via_backbone)


def test_pickscore_without_tokenizer_names_what_is_missing(pickscore_dirs, tmp_path):
    model_dir, _ = pickscore_dirs
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(UserError, match="vocab.json"):
        load_reward("pickscore", pickscore=str(model_dir), backbone=str(empty))


def _hpsv2_release_open_clip():
    """The open_clip copy inside the ``hpsv2`` release (hpsv2/src/open_clip), imported without the package's
    ``__init__`` (it imports ``clint`` and downloads weights). The wheel lacks the BPE vocabulary its tokenizer
    module reads on import, so that one module stands in as the open_clip package's (the same CLIP BPE), and
    ``hpsv2.utils`` (read for its hps_version_map) imports ``clint`` for download progress bars, never used here."""
    spec = importlib.util.find_spec("hpsv2")
    assert spec is not None, (
        "the reference package is missing: pip install --no-deps hpsv2==1.2.0 (README test command)"
    )
    saved = {k: sys.modules.get(k) for k in ("hpsv2", "hpsv2.src.open_clip.tokenizer", "clint", "clint.textui")}
    package = types.ModuleType("hpsv2")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["hpsv2"] = package
    sys.modules["hpsv2.src.open_clip.tokenizer"] = open_clip.tokenizer
    sys.modules["clint"] = types.ModuleType("clint")
    sys.modules["clint.textui"] = types.SimpleNamespace(progress=None)
    try:
        release = importlib.import_module("hpsv2.src.open_clip")
        versions = importlib.import_module("hpsv2.utils").hps_version_map
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    return release, versions


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_hps_versions_match_the_hpsv2_release(version, hpsv2_dir, sample_images, tmp_path):
    """Each version against hpsv2 1.2.0's own path (img_score.score): its open_clip's create_model_and_transforms,
    the version's file from its hps_version_map, preprocess_val on the PIL image, the diagonal of
    image_features @ text_features.T with output_dict=True."""
    release, version_files = _hpsv2_release_open_clip()
    (tmp_path / "TinyHPS.json").write_text(json.dumps(TINY_OPEN_CLIP["model_cfg"]))
    release.add_model_config(tmp_path / "TinyHPS.json")
    cfg = TINY_OPEN_CLIP["preprocess_cfg"]
    model, _, preprocess_val = release.create_model_and_transforms(
        "TinyHPS", precision="fp32", image_mean=cfg["mean"], image_std=cfg["std"], light_augmentation=True,
        output_dict=True,
    )  # fmt: skip
    checkpoint = torch.load(hpsv2_dir / version_files[f"v{version}"], weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.no_grad():
        outputs = model(
            torch.stack([preprocess_val(im) for im in _pil(sample_images[:3])]), open_clip.tokenize(PROMPTS)
        )
        expected = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)
        reward = load_reward(f"hpsv{version}", hpsv2=str(hpsv2_dir))
        got = reward(_tensor(sample_images[:3]), PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert reward.name == f"hpsv{version}"
    assert reward.provenance() == {
        f"hpsv{version}": {"version": version, "weights": str((hpsv2_dir / version_files[f"v{version}"]).resolve())}
    }


def test_hpsv2_is_v21_and_a_file_of_the_other_version_is_refused(hpsv2_dir, sample_images):
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        alias = load_reward("hpsv2", hpsv2=str(hpsv2_dir))(x, PROMPTS)
        v21 = load_reward("hpsv2.1", hpsv2=str(hpsv2_dir / "HPS_v2.1_compressed.pt"))(x, PROMPTS)
        v20 = load_reward("hpsv2.0", hpsv2=str(hpsv2_dir))(x, PROMPTS)
    torch.testing.assert_close(alias, v21)
    assert not torch.allclose(v20, v21, atol=1e-4), "the two versions loaded the same weights"
    with pytest.raises(UserError, match=r"is HPS v2\.0's file; pass --reward hpsv2\.0"):
        load_reward("hpsv2", hpsv2=str(hpsv2_dir / "HPS_v2_compressed.pt"))
    with pytest.raises(UserError, match=r"is HPS v2\.1's file; pass --reward hpsv2\.1"):
        load_reward("hpsv2.0", hpsv2=str(hpsv2_dir / "HPS_v2.1_compressed.pt"))
    mix = load_reward("hpsv2.0:1,hpsv2:0.5", hpsv2=str(hpsv2_dir))
    with torch.no_grad():
        torch.testing.assert_close(mix(x, PROMPTS), v20 + 0.5 * v21)
    assert set(mix.provenance()) == {"hpsv2.0", "hpsv2.1"}
    assert canonical_spec("HPSv2:0.5,icthp") == "hpsv2.1:0.5,icthp"


def test_aesthetic_is_mlp_on_normalised_clip_image_embedding(clip_dir, aesthetic_dir, sample_images):
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    mlp = _aesthetic_mlp(768).eval()
    state = torch.load(aesthetic_dir / AESTHETIC_PTH, weights_only=True)
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    pixels = proc(images=_pil(sample_images[:3]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = _emb(model.get_image_features(pixel_values=pixels))
        expected = mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got = load_reward("aesthetic", aesthetic=str(aesthetic_dir), clip=str(clip_dir))(
            _tensor(sample_images[:3]), PROMPTS
        )
        from_file = load_reward("aesthetic", aesthetic=str(aesthetic_dir / AESTHETIC_PTH), clip=str(clip_dir))(
            _tensor(sample_images[:3]), None
        )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_file, got)
    assert got.std() > 1e-4, "aesthetic scores should differ between images"


def test_aesthetic_head_as_safetensors(clip_dir, aesthetic_dir, tmp_path, sample_images):
    save_state_dict(
        torch.load(aesthetic_dir / AESTHETIC_PTH, weights_only=True),
        tmp_path / "sac+logos+ava1-l14-linearMSE.safetensors",
    )
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        a = load_reward("aesthetic", aesthetic=str(tmp_path), clip=str(clip_dir))(x, None)
        b = load_reward("aesthetic", aesthetic=str(aesthetic_dir), clip=str(clip_dir))(x, None)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- behaviour shared by all four


@pytest.fixture(scope="module")
def all_sources(clip_dir, pickscore_dirs, hpsv2_dir, aesthetic_dir) -> dict[str, str]:
    return {
        "clip": str(clip_dir),
        "pickscore": str(pickscore_dirs[0]),
        "backbone": str(pickscore_dirs[1]),
        "hpsv2": str(hpsv2_dir),
        "aesthetic": str(aesthetic_dir),
    }


@pytest.mark.parametrize("name", ["clip", "pickscore", "hpsv2.1", "aesthetic"])
def test_gradients_reach_pixels_and_batch_order_does_not_matter(name, all_sources):
    reward = load_reward(name, **all_sources)
    assert reward.name == name
    torch.manual_seed(0)
    x = torch.rand(3, 3, 240, 256, requires_grad=True)  # not 224: the torch resize path is on
    scores = reward(x, PROMPTS)
    scores.sum().backward()
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    perm = [2, 0, 1]
    with torch.no_grad():
        permuted = reward(x.detach()[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(permuted, scores.detach()[perm], atol=1e-5, rtol=1e-5)


def test_weighted_mix_equals_weighted_sum_and_shares_clip(clip_dir, aesthetic_dir, sample_images):
    kw = dict(clip=str(clip_dir), aesthetic=str(aesthetic_dir))
    mix = load_reward("clip:1.0,aesthetic:0.5", **kw)
    assert mix.rewards["aesthetic"].tower is mix.rewards["clip"].tower
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        expected = load_reward("clip", **kw)(x, PROMPTS) + 0.5 * load_reward("aesthetic", **kw)(x, PROMPTS)
        torch.testing.assert_close(mix(x, PROMPTS), expected)


# ---------------------------------------------------------------- bad checkpoints


def test_checkpoints_matching_no_keys_are_user_errors(clip_dir, hpsv2_dir, tmp_path):
    (tmp_path / "aes").mkdir()
    torch.save({"mlp.0.weight": torch.zeros(1024, 768)}, tmp_path / "aes" / AESTHETIC_PTH)
    with pytest.raises(UserError, match="none of its 1 keys"):
        load_reward("aesthetic", aesthetic=str(tmp_path / "aes"), clip=str(clip_dir))
    (tmp_path / "hps").mkdir()
    (tmp_path / "hps" / "open_clip_config.json").write_text((hpsv2_dir / "open_clip_config.json").read_text())
    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(4)}}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    with pytest.raises(UserError, match="match the model"):
        load_reward("hpsv2", hpsv2=str(tmp_path / "hps"))


def test_missing_files_are_named(tmp_path, clip_dir):
    with pytest.raises(UserError, match=r"HPS_v2\.1_compressed\.pt, HPS_v2\.1\.pt"):
        load_reward("hpsv2", hpsv2=str(tmp_path))
    with pytest.raises(UserError, match=r"HPS_v2_compressed\.pt, HPS_v2\.pt"):
        load_reward("hpsv2.0", hpsv2=str(tmp_path))
    with pytest.raises(UserError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        load_reward("aesthetic", aesthetic=str(tmp_path), clip=str(clip_dir))
    with pytest.raises(UserError, match="config.json"):
        load_reward("clip", clip=str(tmp_path))


@pytest.mark.parametrize("name", ["hpsv2", "aesthetic"])
def test_malicious_pickle_is_refused_and_never_runs(name, tmp_path, clip_dir, hpsv2_dir):
    marker = tmp_path / "pwned"
    d = tmp_path / name
    d.mkdir()
    if name == "hpsv2":
        (d / "open_clip_config.json").write_text((hpsv2_dir / "open_clip_config.json").read_text())
        torch.save({"state_dict": _Evil(marker)}, d / "HPS_v2.1_compressed.pt")
    else:
        torch.save(_Evil(marker), d / AESTHETIC_PTH)
    with pytest.raises(UserError, match="refused"):
        load_reward(name, clip=str(clip_dir), **{name: str(d)})
    assert not marker.exists()


def test_hub_default_offline_is_a_clear_error():
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        pytest.skip("needs HF_HUB_OFFLINE (set by conftest) so nothing downloads")
    with pytest.raises(OfflineError, match="xswu/HPSv2"):
        load_reward("hpsv2")


def test_hpsv2_checkpoint_covering_part_of_the_model_warns(hpsv2_dir, tmp_path):
    state = torch.load(hpsv2_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save(
        {"state_dict": {k: v for k, v in state.items() if k.startswith("visual.")}},
        tmp_path / "HPS_v2.1_compressed.pt",
    )
    (tmp_path / "open_clip_config.json").write_text((hpsv2_dir / "open_clip_config.json").read_text())
    with pytest.warns(UserWarning, match="random init"):
        load_reward("hpsv2", hpsv2=str(tmp_path))


def test_each_reward_counts_the_prompts_its_text_encoder_cuts(all_sources):
    rewards = load_rewards(["clip", "pickscore", "hpsv2", "aesthetic"], **all_sources)
    rewards["mix"] = load_reward("clip:1.0,aesthetic:0.5", **all_sources)
    fits, cut = "red " * 75, "red " * 76  # with the start and end tokens: 77 (fits), 78 (one too many)
    for name in ("clip", "pickscore", "hpsv2"):
        (limit,) = rewards[name].text_limits()
        assert limit.max_tokens == 77 and limit.count_truncated([fits, cut, "a cat", cut + "more"]) == 2, name
    assert rewards["aesthetic"].text_limits() == []  # reads no prompt
    assert rewards["mix"].text_limits() == [rewards["mix"].rewards["clip"].tower]
    notes = long_prompt_notes([fits, cut, cut, "a cat"], reward_limits(rewards))  # repeats count once
    assert notes == [
        "note: 1 of 3 prompts is longer than the CLIP text encoder's 77 tokens (rewards clip, pickscore, mix) and is cut there",
        "note: 1 of 3 prompts is longer than the open_clip text encoder's 77 tokens (reward hpsv2) and is cut there",
    ]


def test_a_run_records_the_hps_version_it_used(hpsv2_dir, sd_model, tiny_cfg, tmp_path):
    """config.yaml names the version an alias stood for; summary.json names each version's weights file."""
    out = tmp_path / "run"
    cfg = tiny_cfg(
        sd_model, out, reward="hpsv2", eval_reward="hpsv2.0", hpsv2=str(hpsv2_dir), steps=1, k=1, sample_steps=2,
        eval_size=2,
    )  # fmt: skip
    run_finetune(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["reward"], saved["eval_reward"]) == ("hpsv2.1", "hpsv2.0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward"] == "hpsv2.1"
    assert summary["reward_weights"] == {
        "hpsv2.1": {"version": "2.1", "weights": str((hpsv2_dir / "HPS_v2.1_compressed.pt").resolve())},
        "hpsv2.0": {"version": "2.0", "weights": str((hpsv2_dir / "HPS_v2_compressed.pt").resolve())},
    }
