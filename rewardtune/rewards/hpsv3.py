"""HPSv3 (Ma et al., ICCV 2025; hub ``MizzenAI/HPSv3``): a human-preference score from Qwen2-VL-7B-Instruct.

As the release (``hpsv3==1.0.0``: ``inference.py``, ``train.py``, ``model/qwen2vl_trainer.py``,
``model/differentiable_image_processor.py``, ``dataset/utils.py``, ``dataset/data_collator_qwen.py``,
``config/HPSv3_7B.yaml``) computes it, differentiably in the pixels:

- image: resized (bicubic, antialiased) to multiples of 28 holding 256 * 28 * 28 pixels (the config's
  ``min_pixels = max_pixels = 200704``: 448 x 448 for a square image), normalised with CLIP's mean and std,
  repeated over Qwen2-VL's two temporal frames and cut into its flattened 14 x 14 patches;
- text: Qwen2-VL-7B-Instruct's chat template around one user turn, the image then the release's instruction
  with the caption and ``<|Reward|>`` (a special token the release adds to the tokenizer);
- model: the Qwen2-VL backbone in bf16 with plain 1-D positions (the release's forward calls the language model
  without Qwen2-VL's multimodal rope index, as transformers 4.45 then numbered the tokens 0..L-1) and an fp32 head
  ``hidden -> 1024 -> 16 -> 2`` on the last hidden state at ``<|Reward|>``; the two outputs are (mu, sigma) of the
  release's uncertainty loss, and the score is mu.

The release's ``HPSv3.safetensors`` holds the whole model (transformers 4.45 key names: ``model.*`` the language
model, ``visual.*``, ``lm_head.*``, ``rm_head.*``); config and tokenizer come from ``Qwen/Qwen2-VL-7B-Instruct``
(its json/txt files only). The unused ``lm_head`` (0.5 B parameters) is not kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..errors import UserError
from ..sources import REWARD_SOURCES, find_file, load_state_dict, resolve
from .base import Reward

CHECKPOINT_FILES = ["HPSv3.safetensors", "model.safetensors", "model.pth", "HPSv3.pth"]
BASE_FILES = ["*.json", "*.txt"]  # the Qwen2-VL base: config, tokenizer, chat template; never its weights
REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # config/HPSv3_7B.yaml min_pixels = max_pixels
FACTOR = 28  # patch 14 x spatial merge 2
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / _STD, the image processor's defaults
STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTHS = (1024, 16)  # qwen2vl_trainer.py: rm_head_type "ranknet" without rm_head_kwargs
OUTPUTS = 2  # output_dim: (mu, sigma)

# dataset/data_collator_qwen.py: INSTRUCTION (the caption in {text_prompt}) + prompt_with_special_token.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291 - the release's trailing spaces are part of the prompt
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
# Qwen2-VL-7B-Instruct's chat template rendered for one user turn (image, then text) with the generation prompt.
CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)


def smart_resize(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """The size the release resizes an image to (``dataset/utils.py`` smart_resize with min = max = ``pixels``):
    multiples of ``factor``, about ``pixels`` in all, the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"hpsv3: image of {height}x{width} is too elongated (aspect ratio over 200)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(images: torch.Tensor, patch: int, temporal: int, merge: int) -> torch.Tensor:
    """(B,3,H,W) normalised images -> Qwen2-VL's flattened patches (B * H/p * W/p, 3 * temporal * p * p), each
    image repeated over the ``temporal`` frames, patches ordered by ``merge`` x ``merge`` blocks."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def reward_head(hidden: int) -> nn.Sequential:
    """The release's ``rm_head`` (``ranknet``): Linear-ReLU-Dropout(0.05)-Linear-ReLU-Linear, same indices."""
    a, b = HEAD_WIDTHS
    return nn.Sequential(
        nn.Linear(hidden, a), nn.ReLU(), nn.Dropout(0.05), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, OUTPUTS)
    )


def _outside_fake_mode():
    """The vision tower reads its grid sizes and attention segments from small tensors (``.tolist()``); under the
    planner's fake tensors those must be real, so the tower runs with fake mode unset (its fake inputs stay fake)."""
    return unset_fake_temporarily()


class HPSv3Reward(Reward):
    """HPSv3's mu for (image, caption), differentiable in the pixels; see the module docstring."""

    name = "hpsv3"

    def __init__(self, vlm: nn.Module, head: nn.Module, tokenizer, pixels: int = PIXELS):
        super().__init__()
        self.vlm = vlm  # transformers' Qwen2VLModel: .visual and .language_model
        self.head = head
        self.tokenizer = tokenizer
        self.pixels = pixels
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id != vlm.config.image_token_id:
            raise UserError(
                f"hpsv3: the tokenizer's {IMAGE_TOKEN} is id {image_id} but the config's image_token_id is "
                f"{vlm.config.image_token_id}; use the config and tokenizer of one Qwen2-VL release (--qwen2vl)"
            )

    def token_ids(self, prompts: list[str], image_tokens: int) -> list[list[int]]:
        """Each prompt's token ids as the release's processor makes them (the image placeholder expanded)."""
        out = []
        for p in prompts:
            text = CHAT.format(
                image=IMAGE_TOKEN * image_tokens, text=INSTRUCTION.format(text_prompt=p) + REWARD_SUFFIX
            )
            out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return out

    def pixel_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(flattened patches, (grid h, grid w)) of float images in [0,1], as the release's tensor path makes them."""
        vision = self.vlm.config.vision_config
        h, w = smart_resize(images.shape[-2], images.shape[-1], self.pixels)
        x = images.float()
        if (h, w) != tuple(images.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        patches = patchify(x, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
        return patches, (h // vision.patch_size, w // vision.patch_size)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        param = next(self.vlm.parameters())
        patches, (gh, gw) = self.pixel_inputs(images.to(param.device))
        merge = self.vlm.config.vision_config.spatial_merge_size
        n_image = gh * gw // merge**2
        ids = self.token_ids(list(prompts), n_image)
        where = []
        for i, row in enumerate(ids):
            if row.count(self.reward_id) != 1 or row.count(self.vlm.config.image_token_id) != n_image:
                raise UserError(
                    f"hpsv3: prompt {i} holds one of the model's special tokens ({REWARD_TOKEN}, {IMAGE_TOKEN}); "
                    f"remove it"
                )
            where.append(row.index(self.reward_id))
        length = max(map(len, ids))
        # right padding; no attention mask is needed: <|Reward|> comes before any padding and attention is causal
        input_ids = torch.tensor([r + [self.pad_id] * (length - len(r)) for r in ids], device=param.device)
        with _outside_fake_mode():
            grid = torch.tensor([[1, gh, gw]] * images.shape[0], device=param.device)
            vision = self.vlm.visual(patches.to(self.vlm.visual.get_dtype()), grid_thw=grid).pooler_output
        embeds = self.vlm.language_model.embed_tokens(input_ids)
        mask = (input_ids == self.vlm.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, vision.to(embeds.dtype))
        # position_ids None: positions 0..L-1 on all three rope sections, as in the release's forward
        hidden = self.vlm.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        at = hidden[torch.arange(len(ids), device=hidden.device), torch.tensor(where, device=hidden.device)]
        head_dtype = next(self.head.parameters()).dtype
        return self.head(at.to(head_dtype))[:, 0].float()


# ---------------------------------------------------------------- building and loading


def vlm_config(base_config: dict, vocab_size: int | None = None):
    """A transformers ``Qwen2VLConfig`` from a Qwen2-VL ``config.json`` dict (the hub's flat layout or the nested
    one), with ``vocab_size`` rows of embeddings (the release resized them to its tokenizer) and SDPA attention."""
    from transformers import Qwen2VLConfig

    data = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config = Qwen2VLConfig(**data)
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


def build_model(config, dtype: torch.dtype = torch.bfloat16, device="cpu") -> tuple[nn.Module, nn.Module]:
    """(Qwen2VLModel, head) with random weights on ``device`` (``"meta"``: none at all), the VLM in ``dtype``, the
    head in fp32 as the release keeps it."""
    from transformers import Qwen2VLModel

    from ..plan.architectures import default_dtype  # noqa: PLC0415 - the planner imports the rewards

    with torch.device(device), default_dtype(dtype):
        vlm = Qwen2VLModel(config)
    with torch.device(device):
        head = reward_head(config.text_config.hidden_size)
    return vlm.eval(), head.eval()


def _split_state(state: dict[str, torch.Tensor], what: str) -> tuple[dict, dict]:
    """The release's keys -> (Qwen2VLModel keys, head keys). transformers 4.45 named the language model ``model.*``
    and the tower ``visual.*``; a re-save under transformers 5 names them ``model.language_model.*`` and
    ``model.visual.*``. ``lm_head`` is dropped (the score never reads it)."""
    vlm, head = {}, {}
    for key, value in state.items():
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith("rm_head."):
            head[k[len("rm_head.") :]] = value
        elif k.startswith(("model.language_model.", "model.visual.")):
            vlm[k[len("model.") :]] = value
        elif k.startswith("model."):
            vlm["language_model." + k[len("model.") :]] = value
        elif k.startswith("visual."):
            vlm[k] = value
        elif not k.startswith("lm_head."):
            raise UserError(f"{what}: unexpected tensor '{key}'; is it an HPSv3 checkpoint?")
    if not head or "language_model.embed_tokens.weight" not in vlm:
        raise UserError(f"{what}: no rm_head.* or language model embeddings in it; is it an HPSv3 checkpoint?")
    return vlm, head


def _load_into(module: nn.Module, state: dict, what: str) -> None:
    """Assign ``state`` to a module built on meta (no second copy of the weights); every key must match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        first = (missing or extra)[0]
        kind = "lacks" if missing else "has an unexpected"
        raise UserError(
            f"{what}: the checkpoint {kind} tensor '{first}' ({len(missing)} missing, {len(extra)} unexpected); "
            f"does the Qwen2-VL config (--qwen2vl) match it?"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(
                f"{what}: tensor '{k}' has shape {tuple(v.shape)} but the config gives {tuple(own[k].shape)}; "
                f"use the Qwen2-VL config the checkpoint was trained from (--qwen2vl)"
            )
    module.load_state_dict(state, strict=True, assign=True)


def _rebuild_buffers(vlm: nn.Module, device="cpu") -> None:
    """The rotary tables (non-persistent buffers, not in checkpoints) built for real after an assign-load on meta."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding

    with torch.device(device):
        vlm.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=vlm.config.text_config)
        vlm.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(vlm.config.vision_config)
    left = [n for n, t in (*vlm.named_parameters(), *vlm.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"hpsv3: {left[0]} was not loaded")


def checkpoint_file(source) -> Path:
    """The HPSv3 weights file: ``source`` itself, or the first of ``CHECKPOINT_FILES`` in its directory."""
    path = resolve(source or REWARD_SOURCES["hpsv3"].hub, "HPSv3 checkpoint", allow_patterns=CHECKPOINT_FILES[:1])
    return path if path.is_file() else find_file(path, CHECKPOINT_FILES, "HPSv3 checkpoint")


def load_base(source) -> tuple[dict, object]:
    """(config.json dict, tokenizer with ``<|Reward|>`` added as the release adds it) of the Qwen2-VL base."""
    from transformers import AutoTokenizer

    what = "Qwen2-VL base of HPSv3"
    directory = resolve(source or REWARD_SOURCES["qwen2vl"].hub, what, allow_patterns=BASE_FILES)
    config_file = find_file(directory, ["config.json"], what)
    try:
        config = json.loads(config_file.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(f"{what}: could not read '{directory}' ({type(exc).__name__}: {str(exc)[:160]})") from None
    if config.get("model_type") != "qwen2_vl":
        raise UserError(f"{what}: '{config_file}' is a {config.get('model_type')!r} config, not qwen2_vl")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return config, tokenizer


def build_hpsv3(source=None, dtype=None, sources=None, get=None) -> HPSv3Reward:
    """The release's ``HPSv3.safetensors`` (or a ``weights_only`` pickle) over the Qwen2-VL base's config and
    tokenizer (``sources['qwen2vl']``, default ``Qwen/Qwen2-VL-7B-Instruct``: json/txt files, no weights).
    ``dtype``: the VLM's (default bf16, as released); the head stays fp32."""
    config_dict, tokenizer = load_base((sources or {}).get("qwen2vl"))
    ckpt = checkpoint_file(source)
    what = f"HPSv3 checkpoint '{ckpt}'"
    vlm_state, head_state = _split_state(load_state_dict(ckpt, "HPSv3 checkpoint"), what)
    rows = vlm_state["language_model.embed_tokens.weight"].shape[0]
    reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if reward_id >= rows:
        raise UserError(
            f"{what}: its {rows} token embeddings lack {REWARD_TOKEN} (id {reward_id} in the tokenizer); "
            f"use the Qwen2-VL tokenizer it was trained with (--qwen2vl)"
        )
    vlm, head = build_model(vlm_config(config_dict, rows), dtype or torch.bfloat16, "meta")
    dt = dtype or torch.bfloat16
    _load_into(vlm, {k: v.to(dt) for k, v in vlm_state.items()}, what)
    _load_into(head, {k: v.float() for k, v in head_state.items()}, what)
    _rebuild_buffers(vlm)
    return HPSv3Reward(vlm, head, tokenizer)


# ---------------------------------------------------------------- the planner's full-size architecture

FULL_CONFIG = "qwen2vl_7b_instruct"  # rewardtune/plan/configs/qwen2vl_7b_instruct.json
FULL_VOCAB = 151658  # Qwen2-VL's 151,657 tokens + <|Reward|>: the release's resize_token_embeddings(len(tokenizer))


class _PlanTokenizer:
    """Token ids of the right count for the planner (shapes are all it needs): one id per character, the chat's
    special tokens as themselves."""

    specials = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, IMAGE_TOKEN: 151655, REWARD_TOKEN: 151657}  # fmt: skip
    pad_token_id = 151643

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials[token]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = []
        for i, piece in enumerate(text.split("<|")):
            name, sep, rest = piece.partition("|>") if i else ("", "", piece)
            if sep:
                ids.append(self.specials["<|" + name + "|>"])
            # about four characters a token, as Qwen2's BPE makes of English text
            ids += [0] * (-(-len(rest) // 4))
        return {"input_ids": ids}


def plan_stacks() -> dict[str, int]:
    """The planner's repeated layers ({stack name: released depth}): Qwen2-VL-7B's 28 language-model layers and
    32 vision blocks. The gradient to the pixels runs through both."""
    from ..plan.architectures import arch_config  # noqa: PLC0415 - the planner imports the rewards

    config = arch_config(FULL_CONFIG)
    return {"reward.text": config["num_hidden_layers"], "reward.vision": config["vision_config"]["depth"]}


def build_full_size(device="meta", dtype=None, depths: dict[str, int] | None = None) -> HPSv3Reward:
    """The released architecture (Qwen2-VL-7B-Instruct, 151,658 embeddings, the head; no ``lm_head``) with no
    weights read and nothing downloaded: random (or, on ``"meta"``, no) weights, for the planner; ``depths``:
    other depths of the ``plan_stacks`` (the planner's reduced traces)."""
    from ..plan.architectures import arch_config  # noqa: PLC0415 - the planner imports the rewards

    config = arch_config(FULL_CONFIG)
    depths = depths or {}
    config["num_hidden_layers"] = depths.get("reward.text", config["num_hidden_layers"])
    config["vision_config"] = {**config["vision_config"]}
    config["vision_config"]["depth"] = depths.get("reward.vision", config["vision_config"]["depth"])
    vlm, head = build_model(vlm_config(config, FULL_VOCAB), dtype or torch.bfloat16, device)
    return HPSv3Reward(vlm, head, _PlanTokenizer()).requires_grad_(False)
