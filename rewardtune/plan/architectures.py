"""Full-size architectures without downloads: the planner's data.

The JSON configs in ``configs/`` beside this file are the public ``config.json`` files of SD 1.5, SDXL
base, SD3.5-Medium, SD3.5-Large (and Large-Turbo, the same files), FLUX.1-dev, FLUX.1-schnell and CLIP
ViT-H-14 (the ICT/HP backbone); each names where its values come from in ``_source``. Random weights built
from them cost the same time and memory as the released ones, so benchmarks and the planner need no
download; on the meta device they cost nothing at all (FLUX.1-dev's transformer alone is 48 GB in fp32).
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
from ..finetune import families
from ..finetune.models import assemble_pipeline, model_family
from ..rewards.clip_tower import ClipTower
from ..rewards.icthp import HPHead, HPReward, ICTHPReward, ICTReward

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The JSON file of each part of each full-size architecture, the family of each, and the architecture of each
# ``--model`` alias that has one shipped: as the families declare them (``Family.plan_architectures``, ``Alias.plan``).
ARCHITECTURES = {name: parts for f in families.all_families() for name, parts in f.plan_architectures.items()}
FAMILY_OF = {name: f.name for f in families.all_families() for name in f.plan_architectures}
ARCH_OF_ALIAS = {name: alias.plan for name, (_, alias) in families.aliases().items() if alias.plan}
REWARD_BACKBONE = "clip_vit_h14"
# Rewards whose own module builds the released architecture: ``build_full_size(device="meta", dtype=None)`` there,
# no weights read, nothing downloaded. The ViT-H-14 rewards (ict, hp, icthp; pickscore as ict) are built here.
FULL_SIZE_REWARDS = {
    "hpsv3": "rewardtune.rewards.hpsv3",
    "imagereward": "rewardtune.rewards.imagereward",
}


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


def _tokenizer(tokenizer_dir: Path | None, words: list[str] | None = None):
    """CLIP's full tokenizer (49,408 tokens), written offline from open_clip's BPE file (once per process); with
    ``words``, only the merges those words need (the same tokens for them, ids renumbered; fast to write and load:
    the planner's, whose shapes are all that matter)."""

    from transformers import CLIPTokenizer

    name = ("words", *words) if words else "default"
    if tokenizer_dir is None and name in _TOKENIZERS:
        return _TOKENIZERS[name]
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="rewardtune-tok-") as tmp:
            write_clip_tokenizer(tmp, words)
            _TOKENIZERS[name] = CLIPTokenizer.from_pretrained(tmp)
        return _TOKENIZERS[name]
    directory = Path(tokenizer_dir)
    if not (directory / "vocab.json").is_file():
        write_clip_tokenizer(directory, words)
    return CLIPTokenizer.from_pretrained(str(directory))


# The model parts of a pipeline, and the class that builds each when its config does not name one.
PART_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "transformer_2": None,  # a second transformer (a pair of experts): its config names its class
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
    elif PART_CLASSES[part] is not None:
        package, name = PART_CLASSES[part]
    else:
        raise UserError(f"the config of '{part}' names no class (_class_name or architectures)")
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
    source: str | Path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    vae_dtype: torch.dtype | None = None,
    overrides: dict | None = None,
) -> dict:
    """Random-weight denoiser (UNet or transformer), VAE, text encoder(s) and scheduler of ``source`` (a name in
    ``ARCHITECTURES`` or a diffusers directory, whose weights are never read), built on ``device`` (``"meta"``:
    no memory at all). ``overrides``: {part: {config key: value}} laid over the configs (the planner's fewer layers)."""

    import diffusers

    _, configs, index = _configs(source)
    for part, values in (overrides or {}).items():
        if part in configs:
            configs[part] = {**configs[part], **values}
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
    overrides: dict | None = None,
    tokenizer_words: list[str] | None = None,
):
    """A random-weight pipeline of ``source`` in memory: the family's pipeline class (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``) for a shipped architecture,
    or for a diffusers directory (with its own tokenizers); ``overrides`` as in ``build_parts``; ``tokenizer_words``:
    a CLIP tokenizer of those words only (``_tokenizer``).

    Shipped architectures get CLIP's real tokenizer and, for T5, a small offline unigram tokenizer: prompts are
    padded to ``max_sequence_length`` tokens, so the shapes (all the planner needs) are the real ones."""
    from transformers import AutoTokenizer

    family, _, _ = _configs(source)
    parts = build_parts(source, dtype, device, vae_dtype, overrides)
    _, configs, index = _configs(source)
    settings = configs.get("pipeline", {}) if index is None else index
    if str(source) in ARCHITECTURES:
        tok = _tokenizer(tokenizer_dir, tokenizer_words)
        spec = families.by_name(family)
        toks = spec.plan_tokenizers(parts, tok) if spec.plan_tokenizers else (tok, tok, None)
    else:
        directory = Path(source).expanduser()
        found = [
            AutoTokenizer.from_pretrained(str(directory / name)) if (directory / name).is_dir() else None
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
        ]
        # a second CLIP encoder without a tokenizer of its own uses the first's (SDXL's layout)
        toks = (found[0], found[1] or (found[0] if "text_encoder_2" in parts else None), found[2])
    pipe = assemble_pipeline(family, parts, *toks)
    # the pipeline's own settings (model_index.json's; a shipped architecture's "pipeline" entry), as from_pretrained
    # gives them: Wan 2.2's boundary_ratio and expand_timesteps
    own = {k: v for k, v in settings.items() if not k.startswith("_") and not isinstance(v, list) and k in pipe.config}
    pipe.register_to_config(**own)
    return pipe


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
    tokenizer_words: list[str] | None = None,
    depths: dict[str, int] | None = None,
):
    """ICT, HP or ICT-HP (``name``) on random ViT-H-14 towers (two towers for ICT-HP, as released);
    ``tokenizer_words`` as in ``build_pipeline``. A reward of ``FULL_SIZE_REWARDS`` comes from its module's
    ``build_full_size``, with ``depths`` ({stack name: layers} of the module's ``plan_stacks``) where given;
    ``clip_config`` and the tokenizer do not apply to it."""

    if name in FULL_SIZE_REWARDS:
        module = importlib.import_module(FULL_SIZE_REWARDS[name])
        kw = {"depths": depths} if depths else {}
        return module.build_full_size(device=device, dtype=dtype, **kw).requires_grad_(False).eval()
    if name not in ("ict", "hp", "icthp"):
        known = ", ".join(["ict", "hp", "icthp", *FULL_SIZE_REWARDS])
        raise UserError(f"full-size reward '{name}' is not one of {known}")
    tok = _tokenizer(tokenizer_dir, tokenizer_words)

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
