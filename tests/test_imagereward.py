"""ImageReward: a tiny random model in the hub's layout (``rewardtune.testing.imagereward``), loaded through
``load_reward`` and scored against the released ``image-reward`` package's own modules on the same file.

The reference is the installed package's code, loaded file by file (``ImageReward/ImageReward.py``: ``ImageReward``,
``MLP``, ``score``, ``score_gard``; ``models/BLIP/blip_pretrain.py``: ``BLIP_Pretrain``; ``models/BLIP/med.py``:
``BertModel``; ``models/BLIP/vit.py``: ``VisionTransformer``; ``models/BLIP/blip.py``: ``init_tokenizer``), with
``ImageReward/ReFL.py``'s tensor transform. What it needs from outside, and what stands in:
- its package ``__init__``s import ``clip``, ``ReFL`` (diffusers, datasets ...): not run; stub packages hold the files;
- ``fairscale``'s ``checkpoint_wrapper`` (vit.py; used only with gradient checkpointing, off here): a stand-in;
- transformers 5 removed what med.py imports from ``transformers.modeling_utils`` (``apply_chunking_to_forward``,
  now in ``transformers.pytorch_utils``, is that function; the pruning helpers are never called) and two methods of
  transformers 4's ``ModuleUtilsMixin`` that ``BertModel.forward`` calls: ``get_head_mask`` (no mask: a list of
  None) and ``invert_attention_mask`` (``(1 - mask) * finfo.min``), written back as transformers 4 had them;
  ``init_weights`` (its random init, overwritten by the checkpoint) runs as a plain ``apply(_init_weights)``;
- ``init_tokenizer`` loads ``bert-base-uncased``: its ``BertTokenizer`` reads the tiny vocabulary instead, with
  transformers 4's ``additional_special_tokens_ids``;
- ``ImageReward.__init__`` builds ViT-L (``create_vit('large')``) and ``MLP(768)``: the same classes at the tiny
  sizes (``VisionTransformer`` with the tiny widths; ``MLP(64)`` set after the constructor).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize
from transformers import BertTokenizer, modeling_utils, pytorch_utils

from rewardtune.cli import main
from rewardtune.data import load_triplets
from rewardtune.data.synthetic import WORDS, make_pick_high
from rewardtune.errors import OfflineError, UserError
from rewardtune.finetune import FinetuneConfig
from rewardtune.images import load_image
from rewardtune.prompt_checks import long_prompt_notes, reward_limits
from rewardtune.reward_training import triplet_accuracy
from rewardtune.rewards import load_reward
from rewardtune.rewards.imagereward import BLIP_MED_CONFIG, ImageRewardPreprocess, build_full_size
from rewardtune.sources import load_state_dict, save_state_dict
from rewardtune.testing.cli import run_cli
from rewardtune.testing.imagereward import TINY_VISION, save_tiny_imagereward

PROMPTS = ["a red cube on a wooden table", "a photo of a cat", "blue sky over mountains, highly detailed"]
RELEASE = importlib.util.find_spec("ImageReward")
needs_release = pytest.mark.skipif(
    RELEASE is None, reason="the reference: pip install --no-deps image-reward==1.5 (test-only)"
)


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory) -> Path:
    """THUDM/ImageReward in miniature, with the tokenizer in the same directory."""
    return save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=3, words=WORDS)


@pytest.fixture(scope="module")
def reward(ir_dir):
    return load_reward("imagereward", imagereward=str(ir_dir))


# ---------------------------------------------------------------- the released code as the reference


def _released_modules(tokenizer_dir: Path):
    """(ImageReward.py, blip_pretrain.py, vit.py) of the installed package, imported under stub packages."""
    root = Path(RELEASE.origin).parent
    stubs = {"_irref": root, "_irref.models": root / "models", "_irref.models.BLIP": root / "models" / "BLIP"}
    for name, path in stubs.items():
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(path)]
    wrapper = types.ModuleType("fairscale.nn.checkpoint.checkpoint_activations")
    wrapper.checkpoint_wrapper = None
    fairscale = {n: types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint")}
    removed = {
        "apply_chunking_to_forward": pytorch_utils.apply_chunking_to_forward,
        "find_pruneable_heads_and_indices": None,
        "prune_linear_layer": pytorch_utils.prune_linear_layer,
    }
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # vit.py imports timm's old module paths
        for n, m in {**fairscale, wrapper.__name__: wrapper}.items():
            mp.setitem(sys.modules, n, m)
        for n, v in removed.items():
            if not hasattr(modeling_utils, n):
                mp.setattr(modeling_utils, n, v, raising=False)
        vit = importlib.import_module("_irref.models.BLIP.vit")
        med = importlib.import_module("_irref.models.BLIP.med")
        blip = importlib.import_module("_irref.models.BLIP.blip")
        blip_pretrain = importlib.import_module("_irref.models.BLIP.blip_pretrain")
        release = importlib.import_module("_irref.ImageReward")

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        assert head_mask is None
        return [None] * num_hidden_layers

    def invert_attention_mask(self, encoder_attention_mask):
        mask = encoder_attention_mask[:, None, None, :].to(dtype=self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    med.BertModel.get_head_mask = get_head_mask
    med.BertModel.invert_attention_mask = invert_attention_mask
    med.BertModel.init_weights = lambda self: self.apply(self._init_weights)

    class Bert4(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return super().from_pretrained(str(tokenizer_dir))

        @property
        def additional_special_tokens_ids(self):
            return self.convert_tokens_to_ids(list(self.extra_special_tokens))

    blip.BertTokenizer = Bert4
    t = TINY_VISION

    def tiny_vit(vit, image_size, *args):
        assert vit == "large" and image_size == 224
        model = vit_mod.VisionTransformer(
            img_size=image_size,
            patch_size=t["patch"],
            embed_dim=t["width"],
            depth=t["layers"],
            num_heads=t["width"] // 64,
            mlp_ratio=t["intermediate"] / t["width"],
            drop_path_rate=0.1,
        )
        return model, t["width"]

    vit_mod = vit
    blip_pretrain.create_vit = tiny_vit
    return types.SimpleNamespace(release=release, blip=blip, vit=vit, med=med)


@pytest.fixture(scope="module")
def released(ir_dir):
    """The released ImageReward over the tiny file, loaded as its ``utils.load`` does (strictly here: every
    released name must be in the file, and nothing else)."""
    if RELEASE is None:
        pytest.skip("image-reward is not installed")
    ref = _released_modules(ir_dir)
    model = ref.release.ImageReward(med_config=str(ir_dir / "med_config.json"), device="cpu")
    model.mlp = ref.release.MLP(json.loads((ir_dir / "med_config.json").read_text())["hidden_size"])
    model.load_state_dict(torch.load(ir_dir / "ImageReward.pt", map_location="cpu", weights_only=True))
    ref.model = model.eval()
    return ref


def _refl_transform(release):
    """ImageReward/ReFL.py's reward preprocessing of decoded tensors (in its training loop, ``_transform``)."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return Compose([Resize(224, interpolation=release.BICUBIC), CenterCrop(224), Normalize(mean, std)])


def _tensor(paths):
    return torch.stack([load_image(p) for p in paths])


# ---------------------------------------------------------------- parity


@needs_release
def test_score_matches_the_released_score_on_images(released, reward, sample_images):
    """``ImageReward.score(prompt, PIL image)``, image by image, at 224 px (the PIL resize is then the identity)."""
    with torch.no_grad():
        got = reward(_tensor(sample_images[:3]), PROMPTS)
    expected = torch.tensor([released.model.score(p, Image.open(path)) for p, path in zip(PROMPTS, sample_images[:3])])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert got.std() > 1e-3, "scores should differ between images"


@needs_release
def test_tensor_path_matches_refl_preprocessing_and_score_gard(released, reward):
    """Odd sizes (a truncated long side, rounded crop offsets, an upscale): our torch preprocessing equals ReFL.py's
    torchvision transform, and the score equals ``score_gard`` on it, batched."""
    transform = _refl_transform(released.release)
    torch.manual_seed(1)
    for h, w in ((231, 250), (300, 200), (150, 170)):  # 224 x 224: the test above
        x = torch.rand(3, 3, h, w)
        torch.testing.assert_close(ImageRewardPreprocess()(x), transform(x), atol=1e-5, rtol=0)
        tok = released.model.blip.tokenizer(
            PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        with torch.no_grad():
            expected = released.model.score_gard(tok.input_ids, tok.attention_mask, transform(x)).squeeze(-1)
            got = reward(x, PROMPTS)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"{h}x{w}")


@needs_release
def test_tokenizer_adds_blips_tokens_and_cuts_at_35(released, reward):
    """The same ids as the release's ``init_tokenizer`` tokenizer, [DEC]/[ENC] included, cut at 35 tokens."""
    prompts = ["a [ENC] cube [DEC] on red", "red " * 40]
    ours = reward.tokenize(prompts, "cpu")
    theirs = released.model.blip.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], theirs.input_ids) and ours["input_ids"].shape == (2, 35)
    assert torch.equal(ours["attention_mask"], theirs.attention_mask)
    (limit,) = reward.text_limits()
    assert limit.max_tokens == 35 and limit.count_truncated(["red " * 33, "red " * 34, "a cat"]) == 1
    notes = long_prompt_notes(["red " * 34], reward_limits({"imagereward": reward}))
    assert notes == [
        "note: the prompt is longer than the ImageReward text encoder's 35 tokens (reward imagereward) and is cut there"
    ]


@needs_release
def test_full_size_build_has_the_released_architectures_parameters(released):
    """``build_full_size`` on the meta device against the release's own ViT-L (``blip.create_vit('large')``),
    BERT (``med.BertModel`` over BLIP's med_config) and ``MLP(768)``, less BLIP's two projections, which the score
    does not read."""
    full = build_full_size()
    ours = sum(p.numel() for p in full.parameters())
    med = released.med
    linspace = torch.linspace  # vit.py reads its drop-path schedule with .item(): that one on the CPU
    with torch.device("meta"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
        vit, width = released.blip.create_vit("large", 224)
        config = med.BertConfig(**BLIP_MED_CONFIG)
        config.encoder_width = width
        text = med.BertModel(config, add_pooling_layer=False)
        mlp = released.release.MLP(768)
    theirs = sum(p.numel() for m in (vit, text, mlp) for p in m.parameters())
    assert ours == theirs == 446_206_689
    assert all(p.is_meta for p in full.parameters())
    assert full.preprocess.size == 224 and full.vision.config.num_attention_heads == 16


# ---------------------------------------------------------------- behaviour


def test_gradients_reach_pixels_and_batch_order_does_not_matter(reward):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 240, 256, requires_grad=True)
    scores = reward(x, PROMPTS)
    scores.sum().backward()
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    perm = [2, 0, 1]
    with torch.no_grad():
        permuted = reward(x.detach()[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(permuted, scores.detach()[perm], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in reward.parameters())


def test_tokenizer_from_its_own_source_safetensors_and_the_file_itself(ir_dir, reward, tmp_path):
    """The released layout has no tokenizer: ``imagereward_tokenizer`` names one (and wins over one in the
    directory); a safetensors copy of the weights is preferred to the pickle; the file itself may be given."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ir_dir / "med_config.json", bare)
    save_state_dict(load_state_dict(ir_dir / "ImageReward.pt"), bare / "ImageReward.safetensors")
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(ir_dir / "vocab.txt", tok)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reward(x, PROMPTS[:2])
        for kw in (
            dict(imagereward=str(bare), imagereward_tokenizer=str(tok)),
            dict(imagereward=str(ir_dir / "ImageReward.pt"), imagereward_tokenizer=str(tok / "vocab.txt")),
        ):
            torch.testing.assert_close(load_reward("imagereward", **kw)(x, PROMPTS[:2]), expected)
    with pytest.raises(OfflineError, match=r"--imagereward-tokenizer.*google-bert/bert-base-uncased.*vocab\.txt into"):
        load_reward("imagereward", imagereward=str(bare))
    with pytest.raises(UserError, match=r"--imagereward-tokenizer.*vocab\.txt"):
        load_reward("imagereward", imagereward=str(ir_dir), imagereward_tokenizer=str(bare))


def test_pickle_that_needs_code_is_refused_and_never_runs(ir_dir, tmp_path):
    marker = tmp_path / "pwned"
    shutil.copy(ir_dir / "med_config.json", tmp_path)
    torch.save({"blip.visual_encoder.cls_token": _Evil(marker)}, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="refused") as err:
        load_reward("imagereward", imagereward=str(tmp_path))
    assert "\n" not in str(err.value) and not marker.exists()


def test_missing_or_wrong_files_are_one_line_errors(ir_dir, tmp_path):
    with pytest.raises(UserError, match=r"ImageReward\.safetensors, ImageReward\.pt\].*'" + str(tmp_path)):
        load_reward("imagereward", imagereward=str(tmp_path))
    shutil.copy(ir_dir / "ImageReward.pt", tmp_path)
    shutil.copy(ir_dir / "vocab.txt", tmp_path)
    with pytest.raises(UserError, match=r"med_config\.json"):
        load_reward("imagereward", imagereward=str(tmp_path))
    med = json.loads((ir_dir / "med_config.json").read_text())
    (tmp_path / "med_config.json").write_text(json.dumps(dict(med, num_hidden_layers=1)))
    with pytest.raises(UserError, match=r"fit no part of ImageReward \(e\.g\. 'blip\.text_encoder\.encoder\.layer\.1"):
        load_reward("imagereward", imagereward=str(tmp_path))
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    state = torch.load(ir_dir / "ImageReward.pt", weights_only=True)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match=r"lacks 1 of .*'mlp\.layers\.7\.bias'"):
        load_reward("imagereward", imagereward=str(tmp_path))
    torch.save({"unet.conv_in.weight": torch.zeros(4)}, tmp_path / "ImageReward.pt")
    with pytest.raises(UserError, match="no 'blip.visual_encoder.cls_token'"):
        load_reward("imagereward", imagereward=str(tmp_path))


def test_hub_default_offline_is_a_clear_error():
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        pytest.skip("needs HF_HUB_OFFLINE (set by conftest) so nothing downloads")
    with pytest.raises(OfflineError, match=r"\(--imagereward\): 'THUDM/ImageReward' is not in the local cache"):
        load_reward("imagereward")


def test_cli_score_matches_the_python_api(ir_dir, reward, sample_images):
    r = run_cli(
        "score", *sample_images[2:], "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
        "--reward", "imagereward", "--imagereward", ir_dir, "--threads", 1, "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    with torch.no_grad():
        expected = [reward(load_image(p)[None], [q]).item() for p, q in zip(sample_images[2:], PROMPTS)]
    assert [row["imagereward"] for row in rows] == pytest.approx(expected, abs=1e-4)


def test_eval_reward_table_is_the_by_hand_triplet_accuracy(ir_dir, reward, tmp_path, capsys):
    make_pick_high(tmp_path / "data", {"test": 6}, size=32, seed=5, formats=("parquet",))
    assert main(
        ["eval-reward", "--data", str(tmp_path / "data"), "--split", "test", "--reward", "imagereward",
         "--imagereward", str(ir_dir), "--num-workers", "0", "--threads", "1", "--json"]
    ) == 0  # fmt: skip
    table = json.loads(capsys.readouterr().out)
    triplets = load_triplets(tmp_path / "data", "test")
    images = torch.stack([load_image(p) for paths in triplets.images for p in paths])  # all 32 x 32
    prompts = [prompt for prompt in triplets.easy_prompt for _ in range(3)]
    with torch.no_grad():
        scores = reward(images, prompts).view(-1, 3)
    expected = triplet_accuracy(scores)
    assert table["imagereward"]["n"] == 6
    for k in ("I2>I1", "I3>I2", "I3>I1", "avg"):
        assert table["imagereward"][k] == pytest.approx(expected[k], abs=1e-9), k


def test_mix_with_icthp_and_the_finetune_config_pass_the_sources(
    ir_dir, released_ict, released_hp, tiny_backbone, tmp_path
):
    """``icthp:1,imagereward:0.5`` is the weighted sum; ``finetune``'s config carries both ImageReward sources
    to the loader (``--imagereward``, ``--imagereward-tokenizer``)."""
    srcs = dict(ict=str(released_ict), hp=str(released_hp), backbone=str(tiny_backbone), imagereward=str(ir_dir))
    mix = load_reward("icthp:1,imagereward:0.5", **srcs)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        parts = load_reward("icthp", **srcs)(x, PROMPTS[:2]) + 0.5 * load_reward("imagereward", **srcs)(x, PROMPTS[:2])
        torch.testing.assert_close(mix(x, PROMPTS[:2]), parts)
    cfg = FinetuneConfig(
        model="sd15", output=str(tmp_path), reward="icthp:1,imagereward:0.5", imagereward_tokenizer=str(ir_dir), **srcs
    ).validate()
    assert cfg.reward_sources() == dict(srcs, imagereward_tokenizer=str(ir_dir))


def test_release_style_tiny_dir_has_the_hub_layout(ir_dir):
    assert sorted(p.name for p in ir_dir.iterdir()) == ["ImageReward.pt", "med_config.json", "vocab.txt"]
    state = torch.load(ir_dir / "ImageReward.pt", weights_only=True)
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in state and "blip.vision_proj.weight" in state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
