"""ICT, HP and ICT-HP rewards of Ba et al., ICCV 2025 (arXiv 2507.19002), loaded as released.

- ICT  = cosine of the L2-normalised text and image embeddings of the ICT CLIP.
- HP   = sigmoid(head(image embedding of the HP CLIP)); the head sees the raw (unnormalised) embedding,
         as in the released scoring code.
- ICT-HP = ICT * HP, for one image: rewardtune's own combination. The released code ranks ICT times a softmax
         of the raw HP logits over a triplet (``losses.icthp_scores``), which needs three images of one prompt;
         fine-tuning scores one image, so HP enters through its sigmoid. Where that sigmoid saturates, HP's share
         of the reward's gradient vanishes: ``ICTHPReward.gradient_split`` measures it.

Released layouts: ICT ``<dir>/pytorch_model.bin`` (a CLIPModel state dict laid over the backbone);
HP ``<dir>/hp_backbone/pytorch_model.bin`` and ``<dir>/hp_scorer/mlp_pytorch_model.bin``. Our own
training writes the safetensors equivalents, which load too; from a training run's directory, its ``best/``
(the best validation step) when it kept one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..sources import REWARD_SOURCES, apply_state_dict, find_file, load_state_dict, resolve, reward_model_dir
from .base import Reward
from .clip_tower import TOKENIZER_FILES, ClipTower, CosineReward
from .tower_head import HPHead, TowerHeadReward

__all__ = ["HPHead", "HPReward", "ICTHPReward", "ICTReward"]

ICT_FILES = ["model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin"]
HP_BACKBONE_FILES = ["model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin"]
HP_HEAD_FILES = ["mlp_pytorch_model.safetensors", "mlp.safetensors", "mlp_pytorch_model.bin"]


def _backbone_dir(backbone, fallback: Path | None) -> Path:
    """``--backbone`` if given; else a checkpoint directory that is itself a full HF CLIP (a config and a
    tokenizer in either format: transformers 5 saves only ``tokenizer.json``); else the hub default."""
    if backbone is not None:
        return resolve(backbone, "CLIP backbone")
    if (
        fallback is not None
        and (fallback / "config.json").is_file()
        and any((fallback / name).is_file() for name in TOKENIZER_FILES)
    ):
        return fallback
    return resolve(REWARD_SOURCES["backbone"].hub, "CLIP backbone")


class ICTReward(CosineReward):
    """ICT: cosine of the ICT CLIP's normalised text and image embeddings (its checkpoint laid over the backbone)."""

    name = "ict"

    @classmethod
    def load(cls, ict=None, backbone=None, dtype=None) -> ICTReward:
        ict_dir = resolve(
            ict or REWARD_SOURCES["ict"].hub,
            "ICT checkpoint",
            allow_patterns=["*.bin", "*.safetensors", "*.json", "*.txt"],
        )
        if ict_dir.is_dir():
            ict_dir = reward_model_dir(ict_dir, "ICT checkpoint")
        ckpt = ict_dir if ict_dir.is_file() else find_file(ict_dir, ICT_FILES, "ICT checkpoint")
        tower = ClipTower.from_dir(_backbone_dir(backbone, ict_dir if ict_dir.is_dir() else None), "CLIP backbone")
        apply_state_dict(tower.model, load_state_dict(ckpt, "ICT checkpoint"), f"ICT checkpoint '{ckpt}'")
        if dtype is not None:
            tower.model.to(dtype)
        return cls(tower)


class HPReward(TowerHeadReward):
    """HP: sigmoid of the head on the raw (unnormalised) image embedding, as in the released scoring code."""

    name = "hp"

    @classmethod
    def load(cls, hp=None, backbone=None, dtype=None) -> HPReward:
        hp_dir = resolve(
            hp or REWARD_SOURCES["hp"].hub, "HP checkpoint", allow_patterns=["hp_backbone/*", "hp_scorer/*"]
        )
        hp_dir = reward_model_dir(hp_dir, "HP checkpoint")
        bb_dir, head_dir = hp_dir / "hp_backbone", hp_dir / "hp_scorer"
        bb_ckpt = find_file(bb_dir, HP_BACKBONE_FILES, "HP backbone checkpoint (hp_backbone/)")
        head_ckpt = find_file(head_dir, HP_HEAD_FILES, "HP scorer checkpoint (hp_scorer/)")
        tower = ClipTower.from_dir(_backbone_dir(backbone, bb_dir), "CLIP backbone")
        apply_state_dict(tower.model, load_state_dict(bb_ckpt, "HP backbone"), f"HP backbone '{bb_ckpt}'")
        reward = cls.from_head_state(tower, load_state_dict(head_ckpt, "HP scorer"), f"HP scorer '{head_ckpt}'")
        if dtype is not None:
            tower.model.to(dtype)
        return reward

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class ICTHPReward(Reward):
    """The paper's ICT-HP score for one image: ICT cosine times HP."""

    name = "icthp"

    def __init__(self, ict: ICTReward, hp: HPReward):
        super().__init__()
        self.ict = ict
        self.hp = hp

    def text_limits(self) -> list:
        return self.ict.text_limits()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.ict(images, prompts) * self.hp(images, prompts)

    def gradient_split(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """How much of d(ICT·HP)/d(pixels) comes through each factor, averaged over the batch: the norms of
        HP·dICT (``icthp_grad_ict``) and ICT·dHP (``icthp_grad_hp``; the two sum to the reward's gradient), HP's
        share of their sum (``icthp_hp_share``), and sigmoid'(HP logit)/0.25 (``icthp_hp_slope``: 1 where HP's
        sigmoid is steepest, 0 where it is saturated and passes no gradient). One forward and two backward passes
        through the towers, on a detached copy of ``images``."""
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            ict = self.ict(x, prompts).float()
            hp = torch.sigmoid(self.hp.logits(x).float())
            (through_ict,) = torch.autograd.grad((ict * hp.detach()).sum(), x)
            (through_hp,) = torch.autograd.grad((ict.detach() * hp).sum(), x)
        n_ict, n_hp = (g.float().flatten(1).norm(dim=1) for g in (through_ict, through_hp))
        return {
            "icthp_grad_ict": n_ict.mean().detach(),
            "icthp_grad_hp": n_hp.mean().detach(),
            "icthp_hp_share": (n_hp / (n_ict + n_hp).clamp_min(1e-30)).mean().detach(),
            "icthp_hp_slope": (hp * (1 - hp) / 0.25).mean().detach(),
        }
