"""Tiny real FLUX.2 pipelines (``Flux2Pipeline``, dev-like; ``Flux2KleinPipeline``, klein-like) built from configs and
saved in diffusers format.

Tests use them as a user's local model: the same ``from_pretrained`` path as ``black-forest-labs/FLUX.2-dev`` or
``black-forest-labs/FLUX.2-klein-4B``, with the real part layout and classes (``Flux2Transformer2DModel``,
``AutoencoderKLFlux2`` with latent BatchNorm statistics that are not the identity, a
``Mistral3ForConditionalGeneration`` behind a ``PixtralProcessor`` for dev, a ``Qwen3ForCausalLM`` behind a
``Qwen2Tokenizer`` for klein, and the scheduler config diffusers' conversion script gives both: FLUX.1-dev's) and a
few thousand parameters per part. The text encoders are as deep as the pipelines' prompt layers need (dev reads
hidden states 10/20/30, klein 9/18/27) but a few features wide.

Nothing here downloads: both tokenizers are byte-level BPE vocabularies built in memory from the words of the bundled
prompt sets (and the dev pipeline's system message), with the special tokens of the real ones and chat templates of
our own in each instruct model's turn format (dev: ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``; klein:
``<|im_start|>role ... <|im_end|>``, with an empty ``<think>`` block when thinking is off), which the pipelines' prompt
code takes as it takes the real ones.

Variants: ``dev`` (guidance embedding), ``klein`` (no guidance embedding, ``is_distilled: false``: the klein base
models, sampled with true classifier-free guidance) and ``klein``/``distilled`` (``is_distilled: true``: FLUX.2-klein
4B/9B, sampled without guidance).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .flow_pipelines import SCHEDULERS, prompt_words

TEXT_HIDDEN = 16  # the tiny text encoders' width; the transformer's joint_attention_dim is 3x (three layers stacked)
TEXT_LAYERS = {"dev": 30, "klein": 27}  # the deepest hidden state each pipeline reads (10/20/30, 9/18/27)
LATENT_CHANNELS = 4  # the real VAE has 32; the transformer takes 4x this (the 2x2 patchify)
SPECIAL = {
    "dev": ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    + ["[IMG]", "[IMG_BREAK]", "[IMG_END]"],
    "klein": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
}
# Our chat templates in the turn format of each text encoder's instruct model (module docstring). The pipelines pass
# messages whose content is a string (klein) or a list of {"type": "text", "text": ...} parts (dev).
DEV_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.content is string %}{% set text = m.content %}"
    "{% else %}{% set text = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m.role == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
KLEIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def byte_table() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> character (printable bytes as themselves, the rest as code points from
    256 up), the alphabet of both real tokenizers' BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_bpe(words: list[str], special: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE that merges each of ``words`` (with and without its leading space) left to
    right; anything else falls back to single bytes. ``special`` take the first ids."""
    table = byte_table()
    vocab = {t: i for i, t in enumerate(special)}
    for b in range(256):
        vocab.setdefault(table[b], len(vocab))
    merges, seen = [], set()
    for word in words:
        spelled = "".join(table[b] for b in word.encode())
        for piece in (spelled, table[ord(" ")] + spelled):
            head = piece[0]
            for ch in piece[1:]:
                if (head, ch) not in seen:
                    seen.add((head, ch))
                    merges.append((head, ch))
                head += ch
                vocab.setdefault(head, len(vocab))
    return vocab, merges


def _words(extra: str = "") -> list[str]:
    return sorted(set(prompt_words()) | set(re.findall(r"[A-Za-z]+", extra)))


def dev_tokenizer():
    """FLUX.2-dev's text tokenizer, offline: a byte-level BPE with Mistral's special tokens and our template."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = byte_level_bpe(_words(SYSTEM_MESSAGE), SPECIAL["dev"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL["dev"][4:],
        chat_template=DEV_TEMPLATE,
    )


def dev_processor():
    """A ``PixtralProcessor`` (FLUX.2-dev's tokenizer class) over ``dev_tokenizer``; its image processor is never
    used for text-to-image."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    images = PixtralImageProcessor(patch_size=16, size={"longest_edge": 64})
    return PixtralProcessor(
        image_processor=images, tokenizer=dev_tokenizer(), patch_size=16, chat_template=DEV_TEMPLATE
    )


def klein_tokenizer():
    """A ``Qwen2Tokenizer`` (FLUX.2-klein's class) over an offline byte-level BPE with Qwen's special tokens and our
    template (which takes ``enable_thinking``, as the pipeline passes it)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe(_words(), SPECIAL["klein"])
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        additional_special_tokens=SPECIAL["klein"][1:],
        chat_template=KLEIN_TEMPLATE,
    )
    return tok


def _mistral3(vocab_size: int, image_token: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS["dev"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        rope_theta=1e9,
        sliding_window=None,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16
    )
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=image_token)
    return Mistral3ForConditionalGeneration(config)


def _qwen3(vocab_size: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=2 * TEXT_HIDDEN,
            num_hidden_layers=TEXT_LAYERS["klein"],
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    )


def tiny_flux2_vae(seed: int = 0):
    """An ``AutoencoderKLFlux2`` of FLUX.2's layout (4 levels: images 8x the latent; quant convs; the BatchNorm over
    the 2x2-patchified latent) with running statistics drawn away from 0/1, so de-normalising is never a no-op."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=2,
        sample_size=32,
    )
    g = torch.Generator().manual_seed(seed + 7)
    vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def tiny_flux2_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def build_tiny_flux2_pipeline(variant: str = "dev", distilled: bool = False, seed: int = 0):
    """A tiny random ``Flux2Pipeline`` (``variant='dev'``) or ``Flux2KleinPipeline`` (``'klein'``; ``distilled``: its
    ``is_distilled`` flag). The native size is 1024 px as the pipelines' ``default_sample_size``; pass height/width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    if variant not in ("dev", "klein") or (distilled and variant != "klein"):
        raise ValueError(f"unknown tiny FLUX.2 model {variant!r} (distilled={distilled}); variants: dev, klein")
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux"])
    vae = tiny_flux2_vae(seed)
    if variant == "dev":
        processor = dev_processor()
        text_encoder = _mistral3(len(processor.tokenizer), processor.image_token_id)
        transformer = tiny_flux2_transformer(guidance_embeds=True)
        return Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor, transformer=transformer
        )
    tok = klein_tokenizer()
    text_encoder = _qwen3(len(tok))
    transformer = tiny_flux2_transformer(guidance_embeds=False)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=distilled,
    )


def save_tiny_flux2_pipeline(
    directory: str | Path, variant: str = "dev", distilled: bool = False, seed: int = 0
) -> Path:
    """Build a tiny FLUX.2 pipeline (``build_tiny_flux2_pipeline``) and ``save_pretrained`` it to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_flux2_pipeline(variant, distilled, seed).save_pretrained(directory, safe_serialization=True)
    return directory
