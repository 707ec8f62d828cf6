"""Regenerate every bundled model of the demo from scratch on a CPU.

Order: render a pool of scenes -> world CLIP (contrastive; backbone of ICT/HP and the generator's text
encoder) -> held-out CLIP (another seed and size; the reward fine-tuning never sees) -> VAE
(reconstruction) -> UNet + text encoder (denoising, on captions with some attributes wrong, as web
captions are) -> preference set -> ICT and HP through ``rewardtune.reward_training`` -> the baselines of
``rewardtune demo --compare``: the world CLIP itself and a PickScore-style model fine-tuned from it.

Output layout (``rewardtune/demo/models/`` by default):
``pipeline/`` (a diffusers StableDiffusionPipeline), ``ict/`` (full HF CLIP dir), ``hp/hp_backbone/`` +
``hp/hp_scorer/``, ``heldout_clip/``, ``clip/`` (the world CLIP) and ``pickscore/`` (full HF CLIP dirs),
``build.json`` (settings, timings, validation accuracies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..clip_tokenizer import write_clip_tokenizer
from ..config import add_config_args, build_config, option
from ..data import TripletDataset, collate, load_triplets
from ..errors import UserError
from ..finetune.models import assemble_pipeline
from ..images import load_image
from ..reward_training import TrainRewardConfig, evaluate_rewards, train_reward
from ..rewards import load_reward, load_rewards
from ..rewards.clip_tower import ClipTower
from ..sources import BEST_DIR, atomic_write_text, reward_model_dir
from ..testing import tiny_clip_config, write_clip_processor
from . import world
from .config import MODELS_DIR
from .data import pipeline_sampler, write_preference_set


@dataclass
class BuildConfig:
    output: str = option(str(MODELS_DIR), "where the models go (default: the bundled rewardtune/demo/models)")
    work: str = option("", "scratch directory for the preference set and reward-training runs (default: a temp dir)")
    seed: int = option(0, "random seed of the whole build")
    pool: int = option(20000, "rendered scenes the CLIPs, the VAE and the UNet train on")
    clip_steps: int = option(2500, "world CLIP contrastive steps")
    heldout_steps: int = option(2500, "held-out CLIP contrastive steps")
    vae_steps: int = option(1500, "VAE reconstruction steps")
    unet_steps: int = option(4000, "UNet denoising steps")
    ict_steps: int = option(600, "ICT training steps (train-reward --stage ict)")
    hp_steps: int = option(1500, "HP training steps (train-reward --stage hp)")
    pickscore_steps: int = option(600, "PickScore-style pairwise fine-tuning steps of the world CLIP (baselines)")
    triplets: int = option(4000, "training triplets of the preference set")
    val_triplets: int = option(500, "validation triplets (reward training's evaluation, HP calibration)")
    test_triplets: int = option(1000, "test triplets (benchmarks/demo_targets.py regenerates this split)")
    caption_noise: float = option(0.25, "chance that an attribute named in a pretraining caption is wrong")
    only: list = option([], "build only these parts: clip heldout vae unet data rewards baselines (default: all)")
    threads: int = option(2, "torch CPU threads")
    device: str = option("cpu", "where to train: cpu (the documented way) or cuda, for a quicker exploration")


PARTS = ("clip", "heldout", "vae", "unet", "data", "rewards", "baselines")

# Architectures. The world CLIP's text tower is the generator's text encoder, so its width is the
# UNet's cross-attention width.
WORLD_CLIP = dict(hidden=64, layers=3, heads=4, projection_dim=64, image_size=32, patch_size=8)
HELDOUT_CLIP = dict(hidden=48, layers=2, heads=4, projection_dim=48, image_size=32, patch_size=8)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
UNET = dict(
    # 16 -> 8 -> 4: at 4 x 4 every cell touches or neighbours the border, so the convolutions' padding tells each
    # cell where it is and cross-attention there can place a shape left, right, top, bottom or center; with only
    # the 8 x 8 level (an earlier bundle) the generator ignored position words (oracle position 0.15, chance 0.2)
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
TEXT_LENGTH = 32  # tokens: the world's longest prompt needs 17; CLIP's 77 would only cost compute
# SD's schedule, sampled from t=999 ("trailing"): with "leading" spacing a few DDIM steps start at
# t=901, where training always left a trace of the image (its mean brightness, its layout) that pure
# noise lacks, and the model draws grey backgrounds and ignores positions.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="trailing",
)
# the generator's pretraining captions always name the shape and the position (each still wrong with probability
# --caption-noise): a caption that names the position 70 % of the time gave too weak a signal for a small UNet
UNET_ALWAYS_NAMED = ("shape", "position")
OFFSET_NOISE = 0.1  # per-image, per-channel constant added to the noise, so that dark and bright images are learnt
PRETRAIN_DETAIL = (0.35, 0.45, 0.20)  # detail 0/1/2 in the pretraining pool


def log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def render_pool(n: int, seed: int) -> tuple[list[world.Scene], torch.Tensor]:
    """``n`` random scenes and their images as uint8 (n, 3, 32, 32)."""
    rng = np.random.default_rng([seed, 100])
    scenes = [world.random_scene(rng, detail=int(rng.choice(3, p=PRETRAIN_DETAIL))) for _ in range(n)]
    images = np.stack([(world.render(s) * 255).round().astype(np.uint8) for s in scenes]).transpose(0, 3, 1, 2)
    return scenes, torch.from_numpy(images)


def caption(
    scene: world.Scene, rng: np.random.Generator, noise: float = 0.0, keep: float = 0.7, always=("shape",)
) -> str:
    """A caption naming the attributes in ``always`` and a random subset of the others; each named attribute is
    wrong with probability ``noise``; 'highly detailed' on half of the detailed images."""
    attrs = {a: v for a, v in scene.attributes().items() if a in always or rng.random() < keep}
    for a in list(attrs):
        if rng.random() < noise:
            attrs[a] = str(rng.choice([v for v in world.VALUES[a] if v != attrs[a]]))
    return world.make_prompt(attrs, detailed=scene.detail == 2 and rng.random() < 0.5)


def _floats(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 255.0


# ---------------------------------------------------------------- CLIPs


def train_clip(
    directory: Path,
    scenes,
    images,
    steps: int,
    seed: int,
    arch: dict,
    batch: int = 64,
    lr: float = 2e-3,
    aux_weight: float = 1.0,
    device: str = "cpu",
):
    """A tiny CLIP trained contrastively on the pool, saved as a full HF CLIP directory.

    Targets are multi-positive: caption j matches image i when every attribute it names is shown. Linear
    heads on both embeddings that name the attributes (discarded afterwards) speed up learning shape and
    position, which plain contrastive training of a tiny ViT picks up only after many epochs."""
    from transformers import CLIPModel, CLIPTokenizer

    directory = Path(directory)
    vocab = write_tokenizer(directory)
    torch.manual_seed(seed)
    config = tiny_clip_config(
        vocab,
        projection_dim=arch["projection_dim"],
        image_size=arch["image_size"],
        patch_size=arch["patch_size"],
        hidden=arch["hidden"],
        layers=arch["layers"],
        heads=arch["heads"],
    )
    config.text_config.max_position_embeddings = TEXT_LENGTH
    write_clip_processor(directory, arch["image_size"])
    tower = ClipTower(CLIPModel(config), CLIPTokenizer.from_pretrained(str(directory))).to(device)
    heads = AttributeHeads(arch["projection_dim"]).to(device)
    params = list(tower.model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = _one_cycle(opt, lr, steps)
    rng = np.random.default_rng([seed, 200])
    tower.model.train()
    for step in range(steps):
        idx = rng.integers(0, len(scenes), batch)
        batch_scenes = [scenes[i] for i in idx]
        texts = [caption(s, rng, keep=0.6) for s in batch_scenes]
        match = _match_matrix(batch_scenes, texts).to(device)
        img_raw, txt_raw = tower.encode_image(_floats(images[idx])), tower.encode_text(texts)
        img, txt = F.normalize(img_raw, dim=-1), F.normalize(txt_raw, dim=-1)
        logits = tower.model.logit_scale.exp().clamp(max=100) * img @ txt.T
        contrastive = 0.5 * (_soft_ce(logits, match) + _soft_ce(logits.T, match.T))
        aux = heads.loss(img_raw, batch_scenes, txt_raw, texts)
        _optimizer_step(opt, sched, contrastive + aux_weight * aux)
        if step % 100 == 0 or step == steps - 1:
            log(
                f"clip {directory.name} step {step}/{steps} contrastive {contrastive.item():.3f} attributes {aux.item():.3f}"
            )
    tower.model.eval().cpu()
    tower.model.save_pretrained(directory)
    return tower


class AttributeHeads(torch.nn.Module):
    """Linear heads naming each attribute from an image embedding, or from a text embedding (one more
    class: the caption does not say)."""

    def __init__(self, dim: int):
        super().__init__()
        self.image = torch.nn.ModuleDict({a: torch.nn.Linear(dim, len(world.VALUES[a])) for a in world.ATTRIBUTES})
        self.text = torch.nn.ModuleDict({a: torch.nn.Linear(dim, len(world.VALUES[a]) + 1) for a in world.ATTRIBUTES})

    def loss(self, image_emb, scenes, text_emb, texts) -> torch.Tensor:
        asked = [world.parse_prompt(t) for t in texts]
        total = 0.0
        for a in world.ATTRIBUTES:
            vals = world.VALUES[a]
            shown = torch.tensor([vals.index(getattr(s, a)) for s in scenes], device=image_emb.device)
            said = torch.tensor([vals.index(q[a]) if a in q else len(vals) for q in asked], device=image_emb.device)
            total = (
                total
                + F.cross_entropy(self.image[a](image_emb), shown)
                + F.cross_entropy(self.text[a](text_emb), said)
            )
        return total / (2 * len(world.ATTRIBUTES))


def write_tokenizer(directory: Path) -> int:
    """The real CLIP tokenizer restricted to the world's words, with a ``TEXT_LENGTH`` context."""
    vocab = write_clip_tokenizer(directory, words=world.world_words())
    cfg_path = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = TEXT_LENGTH
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return vocab


def _match_matrix(scenes: list[world.Scene], texts: list[str]) -> torch.Tensor:
    """(images, texts) 1.0 where the image shows every attribute the text names."""
    asked = [world.parse_prompt(t) for t in texts]
    match = np.ones((len(scenes), len(texts)), dtype=np.float32)
    for a in world.ATTRIBUTES:
        shown = np.array([getattr(s, a) for s in scenes])[:, None]
        for j, want in enumerate(asked):
            if a in want:
                match[:, j] *= shown[:, 0] == want[a]
    return torch.from_numpy(match)


def _soft_ce(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution over each row's matches."""
    target = match / match.sum(-1, keepdim=True).clamp_min(1)
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _optimizer_step(opt, sched, loss: torch.Tensor, clip_norm: float = 0.0) -> None:
    """One step of the builders' training loops: backward, optional gradient clipping, optimizer and lr schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_norm)
    opt.step()
    sched.step()


def _one_cycle(opt, lr: float, steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)


# ---------------------------------------------------------------- VAE


def train_vae(images, steps: int, seed: int, batch: int = 32, lr: float = 3e-3, device: str = "cpu"):
    """A small AutoencoderKL (32 px -> 16x16x4 latents) trained for reconstruction; its scaling factor
    is set so that the latents the UNet sees have unit variance, as SD's does."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    k = len(VAE["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * k,
        up_block_types=("UpDecoderBlock2D",) * k,
        sample_size=world.IMAGE_SIZE,
        mid_block_add_attention=False,
        **VAE,
    ).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _one_cycle(opt, lr, steps)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        x = _floats(images[torch.randint(0, len(images), (batch,), generator=g)]).to(device) * 2 - 1
        post = vae.encode(x).latent_dist
        y = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        _optimizer_step(opt, sched, rec + 1e-6 * post.kl().mean())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} reconstruction {rec.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(_floats(images[i : i + 256]).to(device) * 2 - 1).latent_dist.mean
                for i in range(0, min(len(images), 2048), 256)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae.cpu()


@torch.no_grad()
def encode_pool(vae, images, batch: int = 512, device: str = "cpu") -> torch.Tensor:
    """Scaled latent means of every pool image."""
    vae.to(device)
    out = [
        vae.encode(_floats(images[i : i + batch]).to(device) * 2 - 1).latent_dist.mean
        for i in range(0, len(images), batch)
    ]
    vae.cpu()
    return torch.cat(out) * vae.config.scaling_factor


# ---------------------------------------------------------------- generator


def text_encoder_from_clip(clip_dir: Path):
    """The world CLIP's text tower as a ``CLIPTextModel`` (as SD uses CLIP's text encoder)."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(clip_dir))
    text = CLIPTextModel(clip.config.text_config)
    # transformers 5's CLIPTextModel is the text transformer itself; 4.x wraps it in ``.text_model``
    inner = getattr(clip.text_model, "text_model", clip.text_model)
    getattr(text, "text_model", text).load_state_dict(inner.state_dict())
    return text


def train_unet(
    latents,
    scenes,
    text_encoder,
    tokenizer,
    steps: int,
    seed: int,
    noise: float,
    batch: int = 32,
    lr: float = 1e-3,
    text_lr: float = 1e-4,
    uncond: float = 0.1,
    ema: float = 0.995,
    device: str = "cpu",
):
    """Denoising training of a tiny UNet (and, gently, the text encoder) on captions with wrong attributes."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latents.shape[-1],
        in_channels=latents.shape[1],
        out_channels=latents.shape[1],
        cross_attention_dim=text_encoder.config.hidden_size,
        **UNET,
    ).to(device)
    text_encoder.to(device)
    noise_sched = DDPMScheduler(
        **{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset", "timestep_spacing")}
    )
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": lr}, {"params": text_encoder.parameters(), "lr": text_lr}],
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, text_lr], total_steps=max(steps, 2), pct_start=0.05)
    rng = np.random.default_rng([seed, 300])
    g = torch.Generator().manual_seed(seed)
    unet.train()
    text_encoder.train()
    for step in range(steps):
        idx = rng.integers(0, len(scenes), batch)
        texts = [
            "" if rng.random() < uncond else caption(scenes[i], rng, noise=noise, always=UNET_ALWAYS_NAMED)
            for i in idx
        ]
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        hidden = text_encoder(ids).last_hidden_state
        x0 = latents[idx]
        eps = (torch.randn(x0.shape, generator=g) + OFFSET_NOISE * torch.randn(*x0.shape[:2], 1, 1, generator=g)).to(
            device
        )
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g).to(device)
        pred = unet(noise_sched.add_noise(x0, eps, t), t, hidden).sample
        loss = F.mse_loss(pred, eps)
        _optimizer_step(opt, sched, loss, clip_norm=1.0)
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema_unet[k].mul_(decay).add_(v, alpha=1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    unet.load_state_dict(ema_unet)
    return unet.eval().cpu(), text_encoder.eval().cpu()


def save_pipeline(directory: Path, vae, text_encoder, tokenizer, unet) -> None:
    """A diffusers StableDiffusionPipeline directory (no safety checker), with a DDIM scheduler."""
    from diffusers import DDIMScheduler

    parts = dict(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=DDIMScheduler(**SCHEDULER))
    pipe = assemble_pipeline("sd", parts, tokenizer)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp / "tokenizer")  # vocab.json + merges.txt too, for transformers 4.x

    _replace_dir(directory, write)


# ---------------------------------------------------------------- rewards


def train_rewards(
    data_root: Path, backbone: Path, work: Path, out: Path, ict_steps: int, hp_steps: int, seed: int
) -> dict:
    """ICT then HP through ``rewardtune.reward_training``; copies the results to ``out/ict`` and ``out/hp``."""

    common = dict(
        data=str(data_root),
        backbone=str(backbone),
        batch_size=32,
        num_workers=0,
        seed=seed,
        checkpoint_every=0,
        progress=False,
        eval_split="val",
        log_every=50,
        lr_schedule="cosine",
    )
    ict_cfg = TrainRewardConfig(stage="ict", output=str(work / "ict"), steps=ict_steps, lr=1e-4, **common)
    ict_cfg.validate()
    ict_metrics = train_reward(ict_cfg)
    # The paper's HP recipe (lr 3e-6, half the vision layers frozen) is for a pretrained ViT-H over 50k
    # steps; the 3-layer world CLIP learns the detail levels only with every layer trained and a higher lr
    # (val HP accuracy 0.87 against 0.70 with lr 1e-4 and half frozen, 1500 vs 600 steps).
    hp_cfg = TrainRewardConfig(
        stage="hp", output=str(work / "hp"), ict=str(work / "ict"), steps=hp_steps, lr=1e-3, freeze_ratio=0.0, **common
    )
    hp_cfg.validate()
    hp_metrics = train_reward(hp_cfg)
    # the runs' best validation models (best/), which the HP run also trained against, are what ships
    ict_dir, hp_dir = (reward_model_dir(work / name, name.upper()) for name in ("ict", "hp"))
    offset = calibrate_hp(hp_dir, data_root)
    log(f"hp: scorer offset {offset:+.3f} (reference images of the val split now score HP {HP_REFERENCE:.2f})")
    _replace_dir(out / "ict", lambda tmp: _copy_model(ict_dir, tmp))
    _replace_dir(out / "hp", lambda tmp: _copy_model(hp_dir, tmp))
    return {"ict": ict_metrics, "hp": {**hp_metrics, "calibration_offset": offset}}


# HP's losses rank images and never fix the offset of its raw score, so where sigmoid(raw) sits is an
# accident of the initialisation. The offset decides how ICT x HP behaves as a fine-tuning reward:
# around HP = 0.5 the sigmoid is steepest and HP's pixel gradient outweighs ICT's; near 1 HP only
# scales ICT down for images below reference quality. The build therefore shifts the scorer's last
# bias so that the reference images (I3) of the validation split average HP = HP_REFERENCE; rankings,
# triplet accuracies and the ICT x softmax(HP) evaluation are unchanged by a shift.
HP_REFERENCE = 0.97


@torch.no_grad()
def calibrate_hp(
    hp_dir: Path, data_root: Path, target: float = HP_REFERENCE, split: str = "val", limit: int = 500
) -> float:
    """Shift the HP scorer's last bias so that the ``split``'s I3 images average sigmoid(raw) = ``target``;
    returns the shift."""
    import pandas as pd

    frame = pd.read_parquet(data_root / f"{split}.parquet").head(limit)
    hp = load_reward("hp", hp=str(hp_dir)).eval()
    raw = []
    for i in range(0, len(frame), 64):
        paths = frame["refine_image"].iloc[i : i + 64]
        raw.append(hp.logits(torch.stack([load_image(data_root / p) for p in paths])).flatten())
    offset = float(math.log(target / (1 - target)) - torch.cat(raw).mean())
    head = Path(hp_dir, "hp_scorer", "mlp_pytorch_model.safetensors")
    state = load_file(head)
    last = max((k for k in state if k.endswith(".bias")), key=lambda k: int(k.split(".")[1]))
    state[last] = state[last] + offset
    tmp = head.with_name(head.name + ".tmp")
    save_file(state, tmp)
    tmp.replace(head)
    return offset


# ---------------------------------------------------------------- baselines of demo --compare


def build_baselines(data_root: Path, clip_dir: Path, out: Path, steps: int, seed: int, device: str = "cpu") -> dict:
    """The comparison's alignment-only rewards: the world CLIP as it is (``out/clip``) and PickScore's recipe
    on it (``out/pickscore``); returns their triplet accuracy on the validation split."""
    _replace_dir(out / "clip", lambda tmp: _copy_model(clip_dir, tmp))
    _replace_dir(out / "pickscore", lambda tmp: train_pickscore(tmp, data_root, clip_dir, steps, seed, device=device))
    rewards = load_rewards(["clip", "pickscore"], clip=str(out / "clip"), pickscore=str(out / "pickscore"))
    table = evaluate_rewards(data_root, "val", rewards, batch_size=64, progress=False)
    return {name: {f"val/{name}_{k}": v for k, v in row.items()} for name, row in table.items()}


def train_pickscore(
    directory: Path,
    data_root: Path,
    clip_dir: Path,
    steps: int,
    seed: int,
    batch: int = 32,
    lr: float = 1e-4,
    device: str = "cpu",
) -> None:
    """PickScore's recipe (Kirstain et al. 2023) on the world CLIP, saved as a full HF CLIP directory: for each
    preference pair, cross-entropy of the softmax over the two images' logits (logit_scale x cosine with the
    prompt) against the preferred image. The pairs are the ones Pick-a-Pic holds -- the easy prompt with its
    loser I1 and winner I2 -- of the same training split ICT and HP learn from; the refined prompts and I3
    images, which only the paper's set adds, are not used."""
    _copy_model(clip_dir, directory)
    torch.manual_seed(seed)
    tower = ClipTower.from_dir(directory, "world CLIP").to(device)
    table = load_triplets(data_root, "train")
    loader = DataLoader(
        TripletDataset(table),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.AdamW(tower.model.parameters(), lr=lr, weight_decay=0.05)
    sched = _one_cycle(opt, lr, steps)
    tower.model.train()
    step = 0
    while step < steps:
        for b in loader:
            loser, winner = (torch.stack([row[k] for row in b["images"]]) for k in (0, 1))
            img = F.normalize(tower.encode_image(torch.cat([loser, winner])), dim=-1)
            txt = F.normalize(tower.encode_text(b["easy_prompt"]), dim=-1)
            n = len(txt)
            logits = tower.model.logit_scale.exp().clamp(max=100) * torch.stack(
                [(img[:n] * txt).sum(-1), (img[n:] * txt).sum(-1)], -1
            )
            loss = F.cross_entropy(logits, torch.ones(n, dtype=torch.long, device=logits.device))
            _optimizer_step(opt, sched, loss)
            if step % 100 == 0 or step == steps - 1:
                acc = (logits[:, 1] > logits[:, 0]).float().mean().item()
                log(f"pickscore step {step}/{steps} loss {loss.item():.3f} pair accuracy {acc:.2f}")
            step += 1
            if step == steps:
                break
    tower.model.eval().cpu().save_pretrained(directory)


def _copy_model(src: Path, dst: Path) -> None:
    """The model files of a train-reward output (no checkpoints, logs or optimizer state)."""
    skip = {"checkpoints", "logs", "runs", BEST_DIR, "trainer_state.json", "manifest.json"}
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_file() and not (set(rel.parts) & skip) and p.suffix in (".json", ".txt", ".safetensors"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)


def _replace_dir(directory: Path, write) -> None:
    """Write a directory atomically: into a sibling temp dir, then swap it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)
    try:
        write(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- all


def build(cfg: BuildConfig) -> dict:
    """Run the build steps (all, or ``cfg.only``) and write ``build.json`` with settings and timings."""
    unknown = sorted(set(cfg.only) - set(PARTS))
    if unknown:
        raise UserError(f"build: unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    parts = cfg.only or list(PARTS)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="rewardtune-demo-build-"))
    record_path = out / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    run = dict(config=dataclasses.asdict(cfg), machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    if cfg.only and "config" in record:  # a partial rebuild: the full build's settings and timings stay as they were
        run.update(load_average=[round(x, 2) for x in os.getloadavg()])
        record.setdefault("partial_builds", []).append(run)
    else:
        record.update(run)
        run = record
    timings = run.setdefault("seconds", {})

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        log(f"{name} took {timings[name]:.0f} s")
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        return result

    needs_pool = set(parts) & {"clip", "heldout", "vae", "unet"}
    scenes, images = timed("render_pool", lambda: render_pool(cfg.pool, cfg.seed)) if needs_pool else (None, None)
    clip_dir = work / "world_clip"
    if "clip" in parts:
        timed(
            "world_clip",
            lambda: _replace_dir(
                clip_dir,
                lambda tmp: train_clip(tmp, scenes, images, cfg.clip_steps, cfg.seed, WORLD_CLIP, device=cfg.device),
            ),
        )
    if "heldout" in parts:
        h_scenes, h_images = render_pool(cfg.pool // 2, cfg.seed + 1)
        timed(
            "heldout_clip",
            lambda: _replace_dir(
                out / "heldout_clip",
                lambda tmp: train_clip(
                    tmp, h_scenes, h_images, cfg.heldout_steps, cfg.seed + 1, HELDOUT_CLIP, device=cfg.device
                ),
            ),
        )
    if "vae" in parts:
        vae = timed("vae", lambda: train_vae(images, cfg.vae_steps, cfg.seed, device=cfg.device))
        _replace_dir(work / "vae", lambda tmp: vae.save_pretrained(tmp))
    if "unet" in parts:
        timed("unet", lambda: _build_generator(out, work, scenes, images, cfg))
    data_root = work / "preference_set"
    needs_data = {"rewards", "baselines"} & set(parts)
    if "data" in parts or (needs_data and not (data_root / "test.parquet").is_file()):
        sizes = {"train": cfg.triplets, "val": cfg.val_triplets, "test": cfg.test_triplets}
        generate = pipeline_sampler(out / "pipeline") if (out / "pipeline" / "model_index.json").is_file() else None
        if generate is None:
            log(f"no pipeline in '{out}' yet: the preference set gets rendered images only")
        timed("preference_set", lambda: write_preference_set(data_root, sizes, seed=cfg.seed, generate=generate))
    for part in needs_data:
        if not clip_dir.is_dir():
            raise UserError(
                f"build: the {part} step needs the world CLIP '{clip_dir}'; build it first or pass the --work of a run that did"
            )
    if "rewards" in parts:
        metrics = timed(
            "rewards",
            lambda: train_rewards(data_root, clip_dir, work / "rewards", out, cfg.ict_steps, cfg.hp_steps, cfg.seed),
        )
        record["reward_metrics"] = _jsonable(metrics)
    if "baselines" in parts:
        metrics = timed(
            "baselines",
            lambda: build_baselines(data_root, clip_dir, out, cfg.pickscore_steps, cfg.seed, device=cfg.device),
        )
        record["baseline_metrics"] = _jsonable(metrics)
    run["total_seconds"] = round(sum(timings.values()), 1)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _build_generator(out: Path, work: Path, scenes, images, cfg: BuildConfig) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    for need in ("vae", "world_clip"):
        if not (work / need).is_dir():
            raise UserError(
                f"build: the unet step needs '{work / need}'; build it first or pass the --work of a run that did"
            )
    vae = AutoencoderKL.from_pretrained(str(work / "vae"))
    clip_dir = work / "world_clip"
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    latents = encode_pool(vae, images, device=cfg.device)
    unet, text = train_unet(
        latents,
        scenes,
        text_encoder_from_clip(clip_dir),
        tokenizer,
        cfg.unet_steps,
        cfg.seed,
        cfg.caption_noise,
        device=cfg.device,
    )
    save_pipeline(out / "pipeline", vae, text, tokenizer, unet)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}".replace(
        "  ", " "
    )


def main(argv: list[str] | None = None) -> int:
    """Command line of ``scripts/build_demo_models.py``."""

    parser = argparse.ArgumentParser(description="Regenerate the demo's bundled models from scratch on a CPU.")
    add_config_args(parser, BuildConfig)
    args = parser.parse_args(argv)
    try:
        cfg = build_config(BuildConfig, args)
        record = build(cfg)
    except UserError as exc:
        print(f"build: error: {exc}", file=sys.stderr)
        return exc.exit_code
    run = record["partial_builds"][-1] if cfg.only and record.get("partial_builds") else record
    log(f"done in {run['total_seconds']:.0f} s; wrote {cfg.output}")
    return 0
