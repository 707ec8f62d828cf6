"""Full-size architectures without downloads: the planner's data.

The JSON configs in ``configs/`` beside this file are the public ``config.json`` files of SD 1.5, SDXL
base, SD3.5-Medium, SD3.5-Large (and Large-Turbo, the same files), FLUX.1-dev, FLUX.1-schnell and CLIP
ViT-H-14 (the ICT/HP backbone); each names where its values come from in ``_source``. Random weights built
from them cost the same time and memory as the released ones, so benchmarks and the planner need no
download; on the meta device they cost nothing at all (FLUX.1-dev's transformer alone is 48 GB in fp32).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch

from ..clip_tokenizer import write_clip_tokenizer
from ..errors import UserError
from ..finetune.models import assemble_pipeline, model_family
from ..rewards.clip_tower import ClipTower
from ..rewards.icthp import HPHead, HPReward, ICTHPReward, ICTReward
from ..testing.flow_pipelines import t5_tokenizer
from ..testing.qwenimage_pipelines import qwen_tokenizer

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
# SD3.5: CLIP-L with its projection, CLIP-G (the same bigG tower as SDXL's second encoder), T5-XXL's encoder.
_SD35 = {
    "vae": "sd35_vae",
    "text_encoder": "sd35_text_encoder",
    "text_encoder_2": "sdxl_text_encoder_2",
    "text_encoder_3": "t5_xxl_encoder",
    "scheduler": "sd35_scheduler",
}
# FLUX.1: CLIP-L (the same tower as SD 1.5's encoder) and T5-XXL's encoder.
_FLUX = {"vae": "flux_vae", "text_encoder": "sd15_text_encoder", "text_encoder_2": "t5_xxl_encoder"}
ARCHITECTURES.update(
    {
        "sd35m": {"transformer": "sd35m_transformer", **_SD35},
        "sd35l": {"transformer": "sd35l_transformer", **_SD35},
        "fluxdev": {"transformer": "flux_dev_transformer", **_FLUX, "scheduler": "flux_dev_scheduler"},
        "fluxschnell": {"transformer": "flux_schnell_transformer", **_FLUX, "scheduler": "flux_schnell_scheduler"},
        # Qwen-Image: its MMDiT, 3-D VAE and Qwen2.5-VL-7B encoder
        "qwenimage": {
            "transformer": "qwenimage_transformer",
            "vae": "qwenimage_vae",
            "text_encoder": "qwen25vl_7b_text_encoder",
            "scheduler": "qwenimage_scheduler",
        },
    }
)
FAMILY_OF = {"sd15": "sd", "sdxl": "sdxl", "sd35m": "sd3", "sd35l": "sd3", "fluxdev": "flux", "fluxschnell": "flux"}
FAMILY_OF["qwenimage"] = "qwenimage"
# The architecture of each ``--model`` alias that has one shipped (SD3.5-Large-Turbo is SD3.5-Large's files).
ARCH_OF_ALIAS = {
    "sd15": "sd15",
    "sdxl": "sdxl",
    "sd35-medium": "sd35m",
    "sd35-large": "sd35l",
    "sd35-large-turbo": "sd35l",
    "flux-dev": "fluxdev",
    "flux-schnell": "fluxschnell",
    "qwen-image": "qwenimage",
}
REWARD_BACKBONE = "clip_vit_h14"


def arch_config(name: str) -> dict:
    """A shipped config (``sdxl_unet``, ``clip_vit_h14``, ...) without its bookkeeping keys (``_source``)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise UserError(f"no shipped architecture config '{name}'; shipped: {', '.join(names)}")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in ("_source", "_class_name")}


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


# The model parts of a pipeline, and the class that builds each when its config does not name one.
PART_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
}


def _part_class(part: str, config: dict, index: dict | None = None):
    """The class of ``part``: from a directory's model_index.json, else the config's ``_class_name`` (diffusers)
    or ``architectures`` (transformers), else ``PART_CLASSES``."""
    import diffusers
    import transformers

    if index and isinstance(index.get(part), list) and index[part][1]:
        package, name = index[part]
    elif config.get("_class_name"):
        package, name = "diffusers", config["_class_name"]
    elif config.get("architectures"):
        package, name = "transformers", config["architectures"][0]
    else:
        package, name = PART_CLASSES[part]
    return getattr(diffusers if package == "diffusers" else transformers, name)


def _configs(source: str | Path) -> tuple[str, dict, dict | None]:
    """(family, {part: config dict}, model_index or None) of a shipped architecture name or of a diffusers
    directory's configs."""

    if str(source) in ARCHITECTURES:
        names = ARCHITECTURES[str(source)]
        configs = {}
        for part, n in names.items():
            data = json.loads((CONFIG_DIR / f"{n}.json").read_text())
            configs[part] = {k: v for k, v in data.items() if k != "_source"}
        return FAMILY_OF[str(source)], configs, None
    directory = Path(source).expanduser()
    if not (directory / "model_index.json").is_file():
        raise UserError(
            f"--model '{source}' is neither a shipped architecture ({', '.join(ARCHITECTURES)}) nor a local "
            f"diffusers directory (with model_index.json); download the model first or use "
            f"{', '.join(ARCH_OF_ALIAS)}"
        )
    family = model_family(directory)
    index = json.loads((directory / "model_index.json").read_text())
    configs = {"scheduler": json.loads((directory / "scheduler" / "scheduler_config.json").read_text())}
    for part in PART_CLASSES:
        path = directory / part / "config.json"
        if path.is_file() and index.get(part) and index[part][0] is not None:
            configs[part] = json.loads(path.read_text())
    return family, configs, index


def build_parts(
    source: str | Path, dtype: torch.dtype = torch.float32, device="cpu", vae_dtype: torch.dtype | None = None
) -> dict:
    """Random-weight denoiser (UNet or transformer), VAE, text encoder(s) and scheduler of ``source`` (a name in
    ``ARCHITECTURES`` or a diffusers directory, whose weights are never read), built on ``device`` (``"meta"``:
    no memory at all)."""

    import diffusers

    _, configs, index = _configs(source)
    parts = {}
    for part in PART_CLASSES:
        if part not in configs:
            continue
        cls = _part_class(part, configs[part], index)
        part_dtype = (vae_dtype or dtype) if part == "vae" else dtype
        with torch.device(device), default_dtype(part_dtype):
            if issubclass(cls, diffusers.ModelMixin):
                module = cls.from_config({k: v for k, v in configs[part].items() if k != "_class_name"})
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
    """A random-weight pipeline of ``source`` in memory: the family's pipeline class (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``) for a shipped architecture,
    or for a diffusers directory (with its own tokenizers).

    Shipped architectures get CLIP's real tokenizer and, for T5, a small offline unigram tokenizer: prompts are
    padded to ``max_sequence_length`` tokens, so the shapes (all the planner needs) are the real ones."""
    from transformers import AutoTokenizer

    family, _, _ = _configs(source)
    parts = build_parts(source, dtype, device, vae_dtype)
    if str(source) in ARCHITECTURES:
        tok = _tokenizer(tokenizer_dir)
        t5 = _t5_tokenizer() if family in ("sd3", "flux") else None
        toks = {"sd3": (tok, tok, t5), "flux": (tok, t5, None)}.get(family, (tok, tok, None))
        if family == "qwenimage":  # Qwen2's tokenizer, not CLIP's
            toks = (_qwen_tokenizer(), None, None)
    else:
        directory = Path(source).expanduser()
        found = [
            AutoTokenizer.from_pretrained(str(directory / name)) if (directory / name).is_dir() else None
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
        ]
        toks = (found[0], found[1] or (found[0] if family == "sdxl" else None), found[2])
    return assemble_pipeline(family, parts, *toks)


def _t5_tokenizer():
    """A T5 tokenizer built offline (the real one's SentencePiece model is not shipped): the words of the
    planner's prompt, padding and end-of-sequence ids as T5's."""
    if "t5" not in _TOKENIZERS:
        _TOKENIZERS["t5"] = t5_tokenizer(["a", "photograph", "of", "red", "bicycle"])
    return _TOKENIZERS["t5"]


def _qwen_tokenizer():
    """A Qwen2 tokenizer built offline (``testing.qwenimage_pipelines``): the planner's prompt and the pipeline's
    template in whole-word tokens, as the real one splits them."""
    if "qwen" not in _TOKENIZERS:
        _TOKENIZERS["qwen"] = qwen_tokenizer(tempfile.mkdtemp(prefix="rewardtune-qwen-tok-"))
    return _TOKENIZERS["qwen"]


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
