"""Full-size architectures without downloads: the planner's data.

The JSON configs in ``configs/`` beside this file are the public ``config.json`` files of SD 1.5, SDXL
base and CLIP ViT-H-14 (the ICT/HP backbone). Random weights built from them cost the same time and
memory as the released ones, so benchmarks and the planner need no download; on the meta device they
cost nothing at all.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import tempfile
from pathlib import Path

import torch

from ..clip_tokenizer import write_clip_tokenizer
from ..errors import UserError
from ..finetune.models import assemble_pipeline, model_family
from ..rewards.clip_tower import ClipTower
from ..rewards.icthp import HPHead, HPReward, ICTHPReward, ICTReward

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The JSON file of each part of each full-size family.
ARCHITECTURES = {
    "sd15": {
        "unet": "sd15_unet",
        "vae": "sd15_vae",
        "text_encoder": "sd15_text_encoder",
        "scheduler": "sd15_scheduler",
    },
    "sdxl": {
        "unet": "sdxl_unet",
        "vae": "sdxl_vae",
        "text_encoder": "sdxl_text_encoder",
        "text_encoder_2": "sdxl_text_encoder_2",
        "scheduler": "sdxl_scheduler",
    },
}
FAMILY_OF = {"sd15": "sd", "sdxl": "sdxl"}
REWARD_BACKBONE = "clip_vit_h14"


def arch_config(name: str) -> dict:
    """A shipped config (``sdxl_unet``, ``clip_vit_h14``, ...) without its bookkeeping keys (``_source``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise UserError(f"no shipped architecture config '{name}'; shipped: {', '.join(names)}")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("_source", "_class_name")}


def config_class_name(name: str) -> str | None:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text()).get("_class_name")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in ``dtype`` (no fp32 copy first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


_TOKENIZERS: dict = {}


def _tokenizer(tokenizer_dir: Path | None):
    """CLIP's full tokenizer (49,408 tokens), written offline from open_clip's BPE file (once per process)."""

    from transformers import CLIPTokenizer

    if tokenizer_dir is None and "default" in _TOKENIZERS:
        return _TOKENIZERS["default"]
    directory = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="rewardtune-tok-"))
    if not (directory / "vocab.json").is_file():
        write_clip_tokenizer(directory)
    tok = CLIPTokenizer.from_pretrained(str(directory))
    if tokenizer_dir is None:
        _TOKENIZERS["default"] = tok
    return tok


# The frozen parts of each family and the class that builds each from its config.
PART_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}


def _configs(source: str | Path) -> tuple[str, dict]:
    """(family, {part: config dict}) of a shipped architecture name or of a diffusers directory's configs."""

    if str(source) in ARCHITECTURES:
        names = ARCHITECTURES[str(source)]
        return FAMILY_OF[str(source)], {
            part: {**arch_config(n), "_class_name": config_class_name(n)} for part, n in names.items()
        }
    directory = Path(source).expanduser()
    if not (directory / "model_index.json").is_file():
        raise UserError(
            f"--model '{source}' is neither a shipped architecture ({', '.join(ARCHITECTURES)}) nor a local "
            f"diffusers directory (with model_index.json); download the model first or use sd15/sdxl"
        )
    family = model_family(directory)
    configs = {"scheduler": json.loads((directory / "scheduler" / "scheduler_config.json").read_text())}
    for part in PART_CLASSES:
        path = directory / part / "config.json"
        if path.is_file():
            configs[part] = json.loads(path.read_text())
    return family, configs


def build_parts(
    source: str | Path, dtype: torch.dtype = torch.float32, device="cpu", vae_dtype: torch.dtype | None = None
) -> dict:
    """Random-weight UNet, VAE, text encoder(s) and scheduler of ``source`` ('sd15', 'sdxl' or a diffusers
    directory, whose weights are never read), built on ``device`` (``"meta"``: no memory at all)."""

    import diffusers

    _, configs = _configs(source)
    parts = {}
    for part, (package, cls_name) in PART_CLASSES.items():
        if part not in configs:
            continue
        cls = getattr(importlib.import_module(package), cls_name)
        part_dtype = (vae_dtype or dtype) if part == "vae" else dtype
        with torch.device(device), default_dtype(part_dtype):
            if package == "diffusers":
                module = cls.from_config(configs[part])
            else:  # transformers builds in a config.json's own "dtype": cast to the one asked for
                config = cls.config_class.from_dict({k: v for k, v in configs[part].items() if not k.startswith("_")})
                module = cls(config).to(part_dtype)
        parts[part] = module.requires_grad_(False).eval()
    sched = configs["scheduler"]
    parts["scheduler"] = getattr(diffusers, sched["_class_name"]).from_config(sched)
    return parts


def build_pipeline(
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    tokenizer_dir: Path | None = None,
    vae_dtype: torch.dtype | None = None,
):
    """A random-weight pipeline of ``source`` in memory: a ``StableDiffusionPipeline`` (sd15) or
    ``StableDiffusionXLPipeline`` (sdxl), or the family of a diffusers directory (with its own tokenizers)."""
    from transformers import CLIPTokenizer

    family, _ = _configs(source)
    parts = build_parts(source, dtype, device, vae_dtype)
    if str(source) in ARCHITECTURES:
        tok = tok2 = _tokenizer(tokenizer_dir)
    else:
        directory = Path(source).expanduser()
        tok = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))
        tok2 = (
            CLIPTokenizer.from_pretrained(str(directory / "tokenizer_2"))
            if (directory / "tokenizer_2").is_dir()
            else tok
        )
    return assemble_pipeline(family, parts, tok, tok2)


def save_pipeline(directory: str | Path, arch: str, dtype: torch.dtype = torch.float16, device=None) -> Path:
    """Write a random-weight full-size pipeline in diffusers format (``from_pretrained`` loads it like the real one)."""
    directory = Path(directory)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build_pipeline(arch, dtype, device, tokenizer_dir=directory / "tokenizer")
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def build_clip(dtype: torch.dtype = torch.float32, device="cpu", config: dict | None = None):
    """A random-weight CLIPModel of ViT-H-14 (or of ``config``: a CLIPConfig dict)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device(device), default_dtype(dtype):
        model = CLIPModel(CLIPConfig(**(config or arch_config(REWARD_BACKBONE))))
    return model.requires_grad_(False).eval()


def build_reward(
    name: str = "icthp",
    dtype: torch.dtype = torch.float32,
    device="cpu",
    tokenizer_dir: Path | None = None,
    clip_config: dict | None = None,
):
    """ICT, HP or ICT-HP (``name``) on random ViT-H-14 towers (two towers for ICT-HP, as released)."""

    if name not in ("ict", "hp", "icthp"):
        raise UserError(f"full-size reward '{name}' is not one of ict, hp, icthp")
    tok = _tokenizer(tokenizer_dir)

    def tower():
        return ClipTower(build_clip(dtype, device, clip_config), tok)

    ict = ICTReward(tower()) if name in ("ict", "icthp") else None
    hp = None
    if name in ("hp", "icthp"):
        t = tower()
        with torch.device(device):
            head = HPHead(t.model.config.projection_dim)
        hp = HPReward(t, head.to(dtype))
    reward = {"ict": ict, "hp": hp}.get(name) or ICTHPReward(ict, hp)
    return reward.to(device).requires_grad_(False).eval()
