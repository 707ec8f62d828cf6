"""ImageReward (Xu et al., NeurIPS 2023; hub ``THUDM/ImageReward``), loaded as released, differentiable in the pixels.

The released model (``ImageReward/ImageReward.py`` of the ``image-reward`` package): BLIP's ViT-L/16 at 224 px
encodes the image; BLIP's BERT text encoder reads the prompt (``bert-base-uncased`` with BLIP's two added tokens,
35 tokens at most) with cross-attention to every image token; an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no
activations) maps the text encoder's first output token (the tokenizer's ``[CLS]``: the release does not put
BLIP's ``[ENC]`` there) to a score, which is normalised by the release's mean and std of its training scores.

The towers are transformers' ports of BLIP's ``vit.py`` and ``med.py`` (``BlipVisionModel``, ``BlipTextModel``),
which compute the same thing; the released state dict's names map onto theirs (``RELEASE_NAMES``).

Released layout: ``ImageReward.pt`` (a pickled state dict: it loads with ``weights_only=True``;
``ImageReward.safetensors`` beside it is preferred) and ``med_config.json`` (the text encoder's BERT config).
The tokenizer is ``google-bert/bert-base-uncased``'s unless the ImageReward directory holds one or
``--imagereward-tokenizer`` names one.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OfflineError, UserError
from ..prompt_checks import HFTokenLimit
from ..sources import REWARD_SOURCES, find_file, load_state_dict, resolve
from .base import Reward
from .clip_tower import CLIP_MEAN, CLIP_STD, MAX_ASPECT
from .tower_head import HPHead

WEIGHT_FILES = ["ImageReward.safetensors", "ImageReward.pt"]
MED_CONFIG = "med_config.json"
TOKENIZER_FILES = ["tokenizer.json", "vocab.txt"]
TOKENIZER_PATTERNS = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# ImageReward.py, ImageReward.__init__: the scores the head gave on the training set, to normalise with
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_TOKENS = 35  # ImageReward.py tokenizes with max_length=35 (padding to it, truncating longer prompts)
IMAGE_SIZE = 224  # ImageReward.py: BLIP_Pretrain(image_size=224), _transform(224)
VIT_HEAD_DIM = 64  # BLIP's ViTs (blip.py, create_vit): base 768 wide / 12 heads, large 1024 / 16
VIT_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6)
ADDED_TOKENS = ({"bos_token": "[DEC]"}, {"additional_special_tokens": ["[ENC]"]})  # blip.py, init_tokenizer

# BLIP's med_config.json as THUDM/ImageReward ships it; the text encoder's cross-attention reads the ViT's width.
BLIP_MED_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "vocab_size": 30524,
    "add_cross_attention": True,
}
VIT_LARGE = {"width": 1024, "layers": 24, "patch": 16, "image_size": IMAGE_SIZE, "intermediate": 4096}

# Released name -> ours, both ways: {i} a block index, {n} 1 or 2, {p} weight or bias. Prefixes: the release's
# ``blip.visual_encoder.`` / ``blip.text_encoder.`` / ``mlp.`` are our ``vision.`` / ``text.`` / ``head.``; the
# text encoder's names are BERT's in both. Released tensors scoring does not read: the BLIP projections
# (``blip.vision_proj``, ``blip.text_proj``) and the position-id buffer.
RELEASE_NAMES = [
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{i}.norm{n}.{p}", "vision.encoder.layers.{i}.layer_norm{n}.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc{n}.{p}", "vision.encoder.layers.{i}.mlp.fc{n}.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    ("blip.text_encoder.{rest}", "text.{rest}"),
    ("mlp.layers.{rest}", "head.layers.{rest}"),
]
UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")
_FIELDS = {"i": r"(?P<i>\d+)", "n": r"(?P<n>[12])", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(_FIELDS[x] if k % 2 else re.escape(x) for k, x in enumerate(parts)))


_RULES = [(_pattern(a), b, _pattern(b), a) for a, b in RELEASE_NAMES]


def our_name(release_key: str) -> str | None:
    """The parameter of ``ImageReward`` a released key sets (None: a key scoring does not read, or unknown)."""
    for pattern, ours, _, _ in _RULES:
        m = pattern.fullmatch(release_key)
        if m:
            return ours.format(**m.groupdict())
    return None


def release_name(key: str) -> str:
    """The released name of one of our parameters (``our_name``'s inverse), for writing the released layout."""
    for _, _, pattern, release in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return release.format(**m.groupdict())
    raise KeyError(key)


# ---------------------------------------------------------------- preprocessing


class ImageRewardPreprocess(nn.Module):
    """The release's image transform in torch: ``Resize(224, BICUBIC)`` (shorter side to 224, the longer to
    ``int(224 * long / short)``; skipped when the size already matches), ``CenterCrop(224)`` (offsets
    ``round((side - 224) / 2)``), CLIP's mean/std, with torchvision's own arithmetic on float pixels, antialiased
    as torchvision (>= 0.17) does for tensors and PIL does for images. Images longer than ``MAX_ASPECT`` times
    their width (or wider) are cut to that first, as ``ClipPreprocess`` does, so that no huge resize is made."""

    def __init__(self, size: int = IMAGE_SIZE):
        super().__init__()
        self.size = int(size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = images.shape[-2:]
        if max(h, w) > MAX_ASPECT * min(h, w):
            long = MAX_ASPECT * min(h, w)
            top, left = ((h - long) // 2, 0) if h > w else (0, (w - long) // 2)
            images = images[..., top : top + min(h, long), left : left + min(w, long)]
            h, w = images.shape[-2:]
        # torchvision.transforms.functional._compute_resized_output_size with size=[s]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        nw, nh = (s, new_long) if w <= h else (new_long, s)
        images = images.float()
        if (nh, nw) != (h, w):
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        images = images[..., top : top + s, left : left + s]
        # the statistics as float32 constants: as buffers, a bf16 reward would round them
        mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        return (images - mean) / std


# ---------------------------------------------------------------- the reward


class ImageReward(Reward):
    """ImageReward's score of each image for its prompt: ``(head(text encoder's first token) - mean) / std``,
    the text encoder attending to the image's ViT tokens; about -2 to 2 for most images (the release's scale)."""

    name = "imagereward"

    def __init__(self, vision: nn.Module, text: nn.Module, head: HPHead, tokenizer):
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        tokenizer.model_max_length = MAX_TOKENS
        self.limit = HFTokenLimit([tokenizer], "ImageReward text encoder")
        self.preprocess = ImageRewardPreprocess(vision.config.image_size)

    def text_limits(self) -> list:
        return [self.limit]

    def tokenize(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"].to(device), "attention_mask": tok["attention_mask"].to(device)}

    def raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The head's output before the normalisation, float32, ``(B,)``."""
        self.check_inputs(images, prompts)
        param = next(self.vision.parameters())
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.text(
            **self.tokenize(prompts, param.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=param.device),
        ).last_hidden_state
        return self.head(text[:, 0]).squeeze(-1).float()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.raw(images, prompts) - SCORE_MEAN) / SCORE_STD


# ---------------------------------------------------------------- architecture


def vision_config(width: int, layers: int, patch: int, image_size: int, intermediate: int):
    """A ``BlipVisionConfig`` of BLIP's ViT (``vit.py``): pre-norm blocks, LayerNorm eps 1e-6, exact GELU."""
    from transformers import BlipVisionConfig

    if width % VIT_HEAD_DIM:
        raise UserError(f"ImageReward checkpoint: a ViT {width} wide is not one of BLIP's (64-dim heads)")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def text_config(med: dict, encoder_width: int):
    """A ``BlipTextConfig`` from BLIP's ``med_config.json`` (a BERT config; missing keys take BERT's defaults, as
    ``BertConfig.from_json_file`` does): cross-attention to ``encoder_width``-wide image tokens in every layer."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=int(med.get("vocab_size", 30522)),
        hidden_size=int(med.get("hidden_size", 768)),
        encoder_hidden_size=int(encoder_width),
        intermediate_size=int(med.get("intermediate_size", 3072)),
        num_hidden_layers=int(med.get("num_hidden_layers", 12)),
        num_attention_heads=int(med.get("num_attention_heads", 12)),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # BlipTextLayer builds its cross-attention only for a "decoder"; run bidirectionally
        use_cache=False,
    )


def build_towers(vision_cfg, text_cfg) -> tuple[nn.Module, nn.Module, HPHead]:
    """The vision tower, text encoder and head, randomly initialised on the current default device."""
    from transformers import BlipTextModel, BlipVisionModel

    vision = BlipVisionModel(vision_cfg)
    text = BlipTextModel(text_cfg, add_pooling_layer=False)
    return vision, text, HPHead(input_dim=text_cfg.hidden_size, hidden_dim=1024)


def _stand_in_tokenizer():
    """A WordPiece tokenizer over a few letters, for the full-size build (which downloads nothing): it pads every
    prompt to the release's 35 tokens, so shapes and memory are those of the real one."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        c for x in "abcdefghijklmnopqrstuvwxyz" for c in (x, "##" + x)
    ]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer.from_pretrained(d)
    for tokens in ADDED_TOKENS:
        tokenizer.add_special_tokens(tokens)
    return tokenizer


def build_full_size(device="meta", dtype=None) -> ImageReward:
    """The released architecture (ViT-L/16 at 224 px, BLIP's BERT with cross-attention, the MLP head) with random
    weights, from configs written here (nothing downloads), for the memory planner; its tokenizer is a stand-in
    that pads prompts to the same 35 tokens. 446,206,689 parameters (the release's file adds BLIP's two unused
    projections, 459,264 more)."""
    with torch.device(device):
        vision, text, head = build_towers(vision_config(**VIT_LARGE), text_config(BLIP_MED_CONFIG, VIT_LARGE["width"]))
        reward = ImageReward(vision, text, head, _stand_in_tokenizer())
    if dtype is not None:
        reward.to(dtype)
    return reward.requires_grad_(False).eval()


# ---------------------------------------------------------------- loading


def _vision_from_state(state: dict[str, torch.Tensor], what: str):
    """The ViT's sizes, read from the checkpoint's shapes (the release builds ViT-L/16 at 224 px)."""
    prefix = "blip.visual_encoder."
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    missing = [prefix + k for k in need if prefix + k not in state]
    if missing:
        raise UserError(f"{what}: no '{missing[0]}' in it; is it ImageReward's ImageReward.pt?")
    width = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    if grid * grid != state[prefix + "pos_embed"].shape[1] - 1:
        raise UserError(f"{what}: its position embedding is not one of a square grid of patches")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    intermediate = state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
    return vision_config(width, layers, patch, grid * patch, intermediate)


def _med_config(path: Path, what: str) -> dict:
    try:
        med = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: '{path}' is not readable JSON ({type(exc).__name__}); re-download it") from None
    if not isinstance(med, dict):
        raise UserError(f"{what}: '{path}' is not a BERT config (a JSON object)")
    if not med.get("add_cross_attention", False):
        raise UserError(f"{what}: '{path}' has no add_cross_attention: true; is it ImageReward's med_config.json?")
    return med


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / n).is_file() for n in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path, source=None, vocab_size: int | None = None):
    """BERT's tokenizer with BLIP's added ``[DEC]`` and ``[ENC]``: from ``source`` (``--imagereward-tokenizer``)
    if given, else the ImageReward directory if it holds one, else the hub's ``google-bert/bert-base-uncased``."""
    from transformers import BertTokenizer

    what = "ImageReward tokenizer (--imagereward-tokenizer)"
    if source is None and _has_tokenizer(model_dir):
        directory = model_dir
    elif source is None:
        hub = REWARD_SOURCES["imagereward_tokenizer"].hub
        try:
            directory = resolve(hub, what, allow_patterns=TOKENIZER_PATTERNS)
        except OfflineError:
            raise OfflineError(
                f"{what}: '{model_dir}' holds no BERT tokenizer (vocab.txt or tokenizer.json) and '{hub}' is neither in "
                f"the local cache nor reachable; copy bert-base-uncased's vocab.txt into that directory or pass "
                f"--imagereward-tokenizer DIR"
            ) from None
    else:
        directory = resolve(source, what, allow_patterns=TOKENIZER_PATTERNS)
        if directory.is_file():
            directory = directory.parent
    find_file(directory, TOKENIZER_FILES, what)
    try:
        tokenizer = BertTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(
            f"{what}: could not load a BERT tokenizer from '{directory}' ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    for tokens in ADDED_TOKENS:
        tokenizer.add_special_tokens(tokens)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(
            f"{what}: '{directory}' has {len(tokenizer)} tokens (with BLIP's [DEC], [ENC]) but the text encoder "
            f"reads {vocab_size}; use bert-base-uncased's tokenizer"
        )
    return tokenizer


def _checkpoint(source) -> Path:
    what = "ImageReward checkpoint"
    path = resolve(
        source or REWARD_SOURCES["imagereward"].hub,
        what,
        allow_patterns=[*WEIGHT_FILES, MED_CONFIG, *TOKENIZER_PATTERNS],
    )
    return path if path.is_file() else find_file(path, WEIGHT_FILES, what)


def build_imagereward(source=None, dtype=None, sources=None, get=None) -> ImageReward:
    """ImageReward from its directory (``ImageReward.pt`` or ``.safetensors`` and ``med_config.json``), the file
    itself (``med_config.json`` beside it) or a hub id (default ``THUDM/ImageReward``)."""
    ckpt = _checkpoint(source)
    what = f"ImageReward checkpoint '{ckpt}'"
    config_path = find_file(ckpt.parent, [MED_CONFIG], "ImageReward checkpoint")
    state = load_state_dict(ckpt, "ImageReward checkpoint")
    vision_cfg = _vision_from_state(state, what)
    text_cfg = text_config(_med_config(config_path, "ImageReward config"), vision_cfg.hidden_size)
    tokenizer = load_tokenizer(ckpt.parent, (sources or {}).get("imagereward_tokenizer"), text_cfg.vocab_size)
    with torch.device("meta"):  # no random init of half a billion weights: the checkpoint sets them all
        vision, text, head = build_towers(vision_cfg, text_cfg)
    reward = ImageReward(vision, text, head, tokenizer)
    wanted = reward.state_dict()
    named = {k: our_name(k) for k in state if not UNUSED.fullmatch(k)}
    unknown = [k for k, n in named.items() if n not in wanted]
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} tensor(s) fit no part of ImageReward (e.g. '{unknown[0]}'); "
            f"is med_config.json the one released with it?"
        )
    absent = sorted(set(wanted) - set(named.values()))
    if absent:
        raise UserError(
            f"{what}: lacks {len(absent)} of the model's {len(wanted)} tensors (e.g. '{release_name(absent[0])}'); "
            f"re-download it"
        )
    for k, n in named.items():
        if tuple(state[k].shape) != tuple(wanted[n].shape):
            raise UserError(
                f"{what}: tensor '{k}' has shape {tuple(state[k].shape)} but med_config.json and the other tensors "
                f"make it {tuple(wanted[n].shape)}; use the med_config.json released with it"
            )
    reward.load_state_dict({n: state[k] for k, n in named.items()}, assign=True)
    _materialise_buffers(reward)
    return reward.to(dtype or torch.float32)


def _materialise_buffers(module: nn.Module) -> None:
    """The buffers no checkpoint holds, left on the meta device by the build: the text encoder's position ids."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"ImageReward: buffer '{name}' has no value (a transformers change?)")
        owner = module.get_submodule(name.rpartition(".")[0])
        owner.position_ids = torch.arange(buf.shape[-1]).expand(buf.shape)
