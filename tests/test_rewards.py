"""ICT, HP and ICT-HP load from the released layouts and score exactly as an independent computation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.errors import OfflineError, UserError
from rewardtune.rewards import load_reward, load_rewards
from rewardtune.rewards.icthp import HPHead


def _pil(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def _tensor(paths):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in _pil(paths)])


def _reference_clip(backbone, ckpt_state):
    """The released scoring code's way: CLIPModel from the backbone, state dict laid over, CLIPProcessor."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(backbone).eval()
    model.load_state_dict(ckpt_state, strict=False)
    return model, CLIPProcessor.from_pretrained(backbone)


def _emb(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


PROMPTS = ["a red cube on a wooden table", "a photo of a cat", "blue sky over mountains, highly detailed"]


def test_ict_matches_independent_computation(tiny_backbone, released_ict, sample_images):
    ref, proc = _reference_clip(tiny_backbone, torch.load(released_ict / "pytorch_model.bin", weights_only=True))
    inputs = proc(text=PROMPTS, images=_pil(sample_images[:3]), return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        t = _emb(ref.get_text_features(input_ids=inputs["input_ids"]))
        i = _emb(ref.get_image_features(pixel_values=inputs["pixel_values"]))
    expected = torch.nn.functional.cosine_similarity(t, i, dim=-1)
    reward = load_reward("ict", ict=str(released_ict), backbone=str(tiny_backbone))
    with torch.no_grad():
        got = reward(_tensor(sample_images[:3]), PROMPTS)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # the checkpoint changed the model: the score differs from the plain backbone's
    plain = _emb(_reference_clip(tiny_backbone, {})[0].get_image_features(pixel_values=inputs["pixel_values"]))
    assert not torch.allclose(plain, i)


def test_hp_matches_independent_computation(tiny_backbone, released_hp, sample_images):
    ref, proc = _reference_clip(tiny_backbone, torch.load(released_hp / "hp_backbone" / "pytorch_model.bin", weights_only=True))
    head = HPHead(1024).eval()
    head.load_state_dict(torch.load(released_hp / "hp_scorer" / "mlp_pytorch_model.bin", weights_only=True))
    pixels = proc(images=_pil(sample_images[:3]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.sigmoid(head(_emb(ref.get_image_features(pixel_values=pixels)))).squeeze(-1)
        got = load_reward("hp", hp=str(released_hp), backbone=str(tiny_backbone))(_tensor(sample_images[:3]), PROMPTS)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert got.std() > 1e-4, "HP scores should differ between images"


def test_icthp_is_product_and_models_are_shared(tiny_backbone, released_ict, released_hp, sample_images):
    r = load_rewards(["ict", "hp", "icthp"], ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    assert r["icthp"].ict is r["ict"] and r["icthp"].hp is r["hp"]
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        torch.testing.assert_close(r["icthp"](x, PROMPTS), r["ict"](x, PROMPTS) * r["hp"](x, PROMPTS))


def test_weighted_mix(tiny_backbone, released_ict, released_hp, sample_images):
    kw = dict(ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    mix = load_reward("ict:1.0,hp:0.5", **kw)
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        torch.testing.assert_close(mix(x, PROMPTS), mix.rewards["ict"](x, PROMPTS) + 0.5 * mix.rewards["hp"](x, PROMPTS))


@pytest.mark.parametrize("name", ["ict", "hp", "icthp"])
def test_gradients_reach_pixels(name, tiny_backbone, released_ict, released_hp, sample_images):
    reward = load_reward(name, ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    # any size: 300x200 goes through the antialiased resize and the centre crop
    x = torch.rand(2, 3, 96, 130, requires_grad=True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batch_order_invariance(tiny_backbone, released_ict, released_hp, sample_images):
    reward = load_reward("icthp", ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone))
    x = _tensor(sample_images[:3])
    perm = [2, 0, 1]
    with torch.no_grad():
        a = reward(x, PROMPTS)
        b = reward(x[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(a[perm], b, atol=1e-5, rtol=1e-5)


def test_safetensors_layout_and_self_contained_dir(tiny_backbone, released_ict, tmp_path, sample_images):
    """Our own ICT output is a full HF CLIP dir with safetensors: usable without --backbone."""
    import shutil

    from transformers import CLIPModel

    d = tmp_path / "ict_ours"
    model = CLIPModel.from_pretrained(tiny_backbone)
    model.load_state_dict(torch.load(released_ict / "pytorch_model.bin", weights_only=True), strict=False)
    model.save_pretrained(d)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        shutil.copy(tiny_backbone / f, d / f)
    x = _tensor(sample_images[:3])
    with torch.no_grad():
        a = load_reward("ict", ict=str(d))(x, PROMPTS)
        b = load_reward("ict", ict=str(released_ict), backbone=str(tiny_backbone))(x, PROMPTS)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
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
