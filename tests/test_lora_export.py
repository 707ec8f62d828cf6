"""The kohya export checked against the loaders users load it with, not against diffusers.

A diffusers round trip accepts diffusers' own names, so it cannot tell whether ComfyUI, A1111 or
kohya-ss/sd-scripts find a key. Below, each loader's rule for which LoRA names it maps is written down
from its source (read there, written here; not copied), applied to the module names of the full-size
SD 1.5 and SDXL architectures (``rewardtune.plan.build_pipeline(..., device="meta")``, the shipped
configs), and every key of an export of a LoRA on those modules must be mapped by every loader.

Sources read:
- ComfyUI, comfyanonymous/ComfyUI: ``comfy/lora.py`` at 41444b5236c613ee5ff7d09aa620f94b702f30eb
  (``model_lora_keys_clip``, ``model_lora_keys_unet``, ``load_lora``), ``comfy/utils.py`` at
  2ba5cc8b867bc1aabe59fdaf0a8489e65012d603 (``unet_to_diffusers``), ``comfy/model_detection.py`` at
  d415a44fe698d8ba6d1a35dd4592dc52d838933e (``detect_unet_config``: the depth lists below).
- kohya-ss/sd-scripts at 48d368fa557731ad0488c07304dfeba8c07910eb: ``networks/lora.py``
  (``LoRANetwork.create_modules``, ``create_network_from_weights``, ``convert_diffusers_to_sai_if_needed``),
  ``library/sdxl_model_util.py`` (``make_unet_conversion_map``), ``library/original_unet.py`` and
  ``library/sdxl_original_unet.py`` (module names), ``requirements.txt`` (transformers==4.54.1).
- ComfyUI for the diffusers-format files (SD3/SD3.5, FLUX.1, the text encoders), Comfy-Org/ComfyUI: ``comfy/lora.py``
  at 17358c8f73b581a0d22facc3c385822f09b8bfb1 (``model_lora_keys_unet``'s SD3 and Flux branches,
  ``model_lora_keys_clip``'s ``text_encoder.text_model.…`` names, ``load_lora``), ``comfy/utils.py`` at
  09708eae709a992a5684bed3595ce4d07e705b4e (``mmdit_to_diffusers`` with SD3.5-Medium's ``attn2``,
  ``flux_to_diffusers``), ``comfy/weight_adapter/lora.py`` at 6f98b150e065f1ffc788558574a887835068bd40
  (``LoRAAdapter.load``/``calculate_weight``: ``lora_B``/``lora_A`` read as up/down, scale ``alpha / rank`` from a
  ``<name>.alpha`` tensor, else 1.0). Forge runs ComfyUI's key maps and scale rule for FLUX.
- A1111, AUTOMATIC1111/stable-diffusion-webui: ``extensions-builtin/Lora/networks.py`` at
  873edba44bedf0086d52343f282552b3601baeb8 (``convert_diffusers_name_to_compvis``, ``load_network``;
  the later release with SD3 support keeps these rules for the names used here) and ``network_lora.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from rewardtune.errors import UserError
from rewardtune.finetune import load_lora
from rewardtune.finetune.families.flux import FLUX_TARGETS
from rewardtune.finetune.families.sd3 import SD3_TARGETS
from rewardtune.finetune.lora import (
    KOHYA_NAME,
    TEXT_TARGETS,
    WEIGHT_NAME,
    add_lora,
    export_kohya,
    kohya_state,
    load_into_adapters,
    save_lora,
)
from rewardtune.plan import build_pipeline
from rewardtune.testing import save_tiny_flow_pipeline, save_tiny_pipeline

ALPHA, RANK = 6.0, 2
# Every Linear layer in the UNet's transformer blocks (the default --lora-targets and the others a user may add).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = TEXT_TARGETS + ["fc1", "fc2"]
LORA_PARTS = {"lora_up.weight", "lora_down.weight", "alpha"}  # what all three read for a plain LoRA module
BLOCK_LEAVES = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
]
CLIP_LEAVES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]

# ---------------------------------------------------------------------------------------------------------------
# The original (ldm / sgm) UNet that A1111 and ComfyUI run and sd-scripts builds for SDXL: where its spatial
# transformers sit and how deep they are. SD 1.5 (v1-inference.yaml: channel_mult 1,2,4,4, two res blocks per
# level, attention at the first three levels, depth 1); SDXL base (sdxl_original_unet.py: no attention at level 0,
# depth 2 at level 1, 10 at level 2 and in the middle). input_blocks.0 is conv_in, every third block after it a
# downsampler; output_blocks run from the deepest level up, three per level.
LDM_TRANSFORMERS = {
    "sd15": {
        **{f"input_blocks.{n}.1": 1 for n in (1, 2, 4, 5, 7, 8)},
        "middle_block.1": 1,
        **{f"output_blocks.{n}.1": 1 for n in range(3, 12)},
    },
    "sdxl": {
        "input_blocks.4.1": 2,
        "input_blocks.5.1": 2,
        "input_blocks.7.1": 10,
        "input_blocks.8.1": 10,
        "middle_block.1": 10,
        **{f"output_blocks.{n}.1": 10 for n in (0, 1, 2)},
        **{f"output_blocks.{n}.1": 2 for n in (3, 4, 5)},
    },
}
# What ComfyUI's detect_unet_config reads from those checkpoints (transformer_depth per input res block,
# transformer_depth_output per output block listed from the last output block to the first).
COMFY_UNET_CONFIG = {
    "sd15": dict(
        num_res_blocks=[2, 2, 2, 2],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1] * 9 + [0] * 3,
        transformer_depth_middle=1,
    ),
    "sdxl": dict(
        num_res_blocks=[2, 2, 2],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
    ),
}
FAMILY = {"sd15": "sd", "sdxl": "sdxl"}


def ldm_modules(arch: str) -> set[str]:
    """The Linear/Conv leaves of the original UNet's spatial transformers, by their ldm names."""
    out = set()
    for where, depth in LDM_TRANSFORMERS[arch].items():
        out |= {f"{where}.proj_in", f"{where}.proj_out"}
        out |= {f"{where}.transformer_blocks.{t}.{leaf}" for t in range(depth) for leaf in BLOCK_LEAVES}
    return out


def te_layers(pipe) -> list[int]:
    return [
        te.config.num_hidden_layers
        for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        if te is not None
    ]


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI: a name is loaded when it is a key of the map model_lora_keys_unet / model_lora_keys_clip build, and the
# file holds <name>.lora_up.weight and <name>.lora_down.weight (+ <name>.alpha); every other key is only warned about.


def comfyui_names(arch: str, layers: list[int]) -> set[str]:
    cfg = COMFY_UNET_CONFIG[arch]
    diffusers = set()

    def transformer(prefix, depth):
        diffusers.update({f"{prefix}.proj_in", f"{prefix}.proj_out"})
        diffusers.update(f"{prefix}.transformer_blocks.{t}.{leaf}" for t in range(depth) for leaf in BLOCK_LEAVES)

    # unet_to_diffusers: input res blocks take transformer_depth in order, output blocks pop transformer_depth_output
    # from its end (deepest level first), the middle has transformer_depth_middle
    depth_in, depth_out = list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    for level, blocks in enumerate(cfg["num_res_blocks"]):
        for i in range(blocks):
            if (d := depth_in.pop(0)) > 0:
                transformer(f"down_blocks.{level}.attentions.{i}", d)
    transformer("mid_block.attentions.0", cfg["transformer_depth_middle"])
    for level, blocks in enumerate(reversed(cfg["num_res_blocks"])):
        for i in range(blocks + 1):
            if (d := depth_out.pop()) > 0:
                transformer(f"up_blocks.{level}.attentions.{i}", d)
    names = {"lora_unet_" + k.replace(".", "_") for k in diffusers}
    names |= {"lora_unet_" + k.replace(".", "_") for k in ldm_modules(arch)}  # its own (ldm) state-dict names too
    # diffusers-format names, bare or after "unet.", with ".processor" before to_q/to_k/to_v/to_out and to_out's ".0" cut
    for k in diffusers:
        k = k.replace(".to_", ".processor.to_")
        k = k[:-2] if k.endswith(".to_out.0") else k
        names |= {k, "unet." + k}
    return names | comfyui_clip_names(layers)


def comfyui_clip_names(layers: list[int]) -> set[str]:
    """model_lora_keys_clip for CLIP-L (SD 1.x, FLUX) or CLIP-L and CLIP-G (SDXL, SD3): clip_l maps lora_te_,
    lora_te1_ and the diffusers name text_encoder.text_model.encoder.layers.<b>.<leaf>; clip_g (clip_l present)
    maps lora_te2_ and text_encoder_2.text_model.encoder.layers.<b>.<leaf>."""
    names = set()
    encoders = [(["lora_te", "lora_te1"], "text_encoder"), (["lora_te2"], "text_encoder_2")][: len(layers)]
    for (prefixes, diffusers), n in zip(encoders, layers, strict=True):
        for b in range(n):
            for leaf in CLIP_LEAVES:
                names |= {f"{p}_text_model_encoder_layers_{b}_{leaf.replace('.', '_')}" for p in prefixes}
                names.add(f"{diffusers}.text_model.encoder.layers.{b}.{leaf}")
    return names


# ---------------------------------------------------------------------------------------------------------------
# kohya-ss/sd-scripts: LoRANetwork creates one module per Linear/Conv2d child of a module whose class is
# Transformer2DModel (+ ResnetBlock2D, Downsample2D, Upsample2D when built from weights) in the UNet, or
# CLIPAttention / CLIPSdpaAttention / CLIPMLP in a text encoder, named (prefix + "." + parent + "." + child) with
# "_" for "."; prefix lora_unet, lora_te (one text encoder) or lora_te1 / lora_te2. The file's weights load into
# those modules non-strictly: a name that is not among them is dropped without a word.


def sd_scripts_te_names(text_encoders) -> set[str]:
    prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
    names = set()
    for prefix, te in zip(prefixes, text_encoders, strict=True):
        # sd-scripts pins transformers 4.54.1, whose CLIPTextModel names its modules text_model.…; transformers 5
        # dropped that level for CLIPTextModel, so the names are taken from the text transformer itself.
        root = getattr(te, "text_model", te)
        for name, module in root.named_modules():
            if type(module).__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                for child, sub in module.named_children():
                    if type(sub).__name__ in ("Linear", "Conv2d"):
                        names.add(f"{prefix}_text_model_{name}_{child}".replace(".", "_"))
    return names


def sd_scripts_unet_names_sd1(unet) -> set[str]:
    # library/original_unet.py keeps diffusers' module names and class names for SD 1.x/2.x
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child, sub in module.named_modules():
                if child and type(sub).__name__ in ("Linear", "Conv2d"):
                    names.add(f"lora_unet_{name}_{child}".replace(".", "_"))
    return names


def sd_scripts_sdxl_conversion() -> list[tuple[str, str]]:
    """make_unet_conversion_map as (diffusers, sai) name pairs with "_" for ".", in its order."""
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        layer.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2."))
    layer.append(("mid_block.attentions.0.", "middle_block.1."))
    layer += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ]
    pairs = []
    for hf, sai in layer:
        pairs += [(hf + h, sai + s) for h, s in resnet] if "resnets" in hf else [(hf, sai)]
    pairs += [(f"time_embedding.linear_{j + 1}.", f"time_embed.{2 * j}.") for j in range(2)]
    pairs += [(f"add_embedding.linear_{j + 1}.", f"label_emb.0.{2 * j}.") for j in range(2)]
    return [(hf.replace(".", "_")[:-1], sai.replace(".", "_")[:-1]) for hf, sai in pairs]


def sd_scripts_sdxl_unet_name(name: str) -> str | None:
    """convert_diffusers_to_sai_if_needed on one lora_unet_ name: the first pair whose diffusers part occurs in it
    is substituted; None where none does (sd-scripts then logs a warning, or fails on the first key)."""
    body = name[len("lora_unet_") :]
    for hf, sai in sd_scripts_sdxl_conversion():
        if hf in body:
            return "lora_unet_" + body.replace(hf, sai)
    return None


def sd_scripts_loaded(arch: str, pipe, text_encoders, names: set[str]) -> set[str]:
    te_names = sd_scripts_te_names(text_encoders)
    if arch == "sd15":
        modules = sd_scripts_unet_names_sd1(pipe.unet) | te_names
        return {n for n in names if n in modules}
    modules = {"lora_unet_" + m.replace(".", "_") for m in ldm_modules(arch)} | te_names  # sdxl_original_unet.py
    return {
        n for n in names if n in te_names or (n.startswith("lora_unet_") and sd_scripts_sdxl_unet_name(n) in modules)
    }


# ---------------------------------------------------------------------------------------------------------------
# A1111: load_network splits each key at its first "." into (name, part), converts the name with
# convert_diffusers_name_to_compvis and looks it up among the webui model's modules (ldm names with "_" for "."),
# then tries: the name without a trailing _q_proj/_k_proj/_v_proj (an open_clip MultiheadAttention), lora_unet ->
# diffusion_model, lora_te1_text_model -> 0_transformer_text_model, then -> transformer_text_model. Unmatched
# names are skipped (only logged).

A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_convert(key: str, is_sd2: bool = False) -> str:
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + 3 * b + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * i}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{3 * b + i}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def a1111_modules(arch: str, layers: list[int]) -> set[str]:
    """The webui model's module names (network_layer_mapping) the LoRA could land on."""
    names = {"diffusion_model_" + m.replace(".", "_") for m in ldm_modules(arch)}
    if arch == "sd15":  # FrozenCLIPEmbedder: a transformers CLIPTextModel (4.x names) as .transformer
        names |= {
            f"transformer_text_model_encoder_layers_{b}_{leaf.replace('.', '_')}"
            for b in range(layers[0])
            for leaf in CLIP_LEAVES
        }
    else:  # conditioner.embedders 0 (the same CLIP-L) and 1 (open_clip ViT-bigG: resblocks with a MultiheadAttention)
        names |= {
            f"0_transformer_text_model_encoder_layers_{b}_{leaf.replace('.', '_')}"
            for b in range(layers[0])
            for leaf in CLIP_LEAVES
        }
        names |= {
            f"1_model_transformer_resblocks_{b}_{leaf}"
            for b in range(layers[1])
            for leaf in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")
        }
    return names


def a1111_module(name: str, modules: set[str]) -> str | None:
    key = a1111_convert(name)
    if key in modules:
        return key
    if (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in modules:
        return m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in modules else None
    if "lora_te1_text_model" in name:
        for to in ("0_transformer_text_model", "transformer_text_model"):
            if (key := name.replace("lora_te1_text_model", to)) in modules:
                return key
    return None


# ---------------------------------------------------------------------------------------------------------------


def meta_lora_states(denoiser, targets, text_encoders, rank, alpha) -> list[dict]:
    """A LoRA on ``targets`` of a meta-device denoiser and on the text encoders' TE_TARGETS; returns full state dicts
    of [denoiser, *text_encoders] with random LoRA weights (for ``save_lora``'s ``states``)."""
    with torch.device("meta"):
        add_lora(denoiser, rank, alpha, targets)
        for te in text_encoders:
            add_lora(te, rank, alpha, TE_TARGETS)
    g = torch.Generator().manual_seed(0)
    return [
        {k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items() if "lora_" in k}
        for m in [denoiser, *text_encoders]
    ]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full_size(request, tmp_path_factory):
    """A rank-2 LoRA on every transformer Linear of the full-size UNet and on both text encoders' attention and MLP
    (meta-device models, weights made real only for the file), saved with ``save_lora`` and exported."""

    arch = request.param
    pipe = build_pipeline(arch, device="meta")
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    shapes = {
        f"{part}.{n}": (m.out_features, m.in_features)
        if hasattr(m, "in_features")
        else (m.out_channels, m.in_channels)
        for part, model in [
            ("unet", pipe.unet),
            ("text_encoder", pipe.text_encoder),
            ("text_encoder_2", getattr(pipe, "text_encoder_2", None)),
        ]
        if model is not None
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    states = meta_lora_states(pipe.unet, UNET_TARGETS, tes, RANK, ALPHA)
    trained = {
        k.split(".lora_")[0]
        for part, st in zip(["unet", "text_encoder", "text_encoder_2"][: len(states)], states, strict=True)
        for k in (f"{part}.{x}" for x in st)
    }
    out = tmp_path_factory.mktemp(f"lora_{arch}")
    save_lora(out, type(pipe), pipe.unet, tes, states)
    state = load_file(str(export_kohya(out, ALPHA)))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value
    return dict(
        arch=arch,
        pipe=pipe,
        tes=tes,
        layers=te_layers(pipe),
        state=state,
        modules=modules,
        trained=trained,
        shapes=shapes,
        dir=out,
    )


def test_ldm_layouts_written_here_are_the_real_architectures(full_size):
    """The transformer layouts above describe the shipped configs: as many transformers and blocks per level."""
    unet = full_size["pipe"].unet
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    transformers = {n.split(".transformer_blocks.")[0] for n in blocks}
    ldm = LDM_TRANSFORMERS[full_size["arch"]]
    assert len(transformers) == len(ldm) and len(blocks) == sum(ldm.values())
    assert sorted(sum(1 for b in blocks if b.startswith(t + ".")) for t in transformers) == sorted(ldm.values())


def test_every_trained_module_is_exported_once_with_its_alpha(full_size):
    """One kohya module per trained module, each with lora_down (rank × in), lora_up (out × rank) and alpha."""
    modules = full_size["modules"]
    assert (
        len(modules) == len(full_size["trained"]) == len(ldm_modules(full_size["arch"])) + 6 * sum(full_size["layers"])
    )
    for name, parts in modules.items():
        assert set(parts) == LORA_PARTS, name
        assert parts["alpha"].numel() == 1 and parts["alpha"].item() == ALPHA, name
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        assert down.shape[0] == RANK and up.shape[1] == RANK, name
    # lora_A is the down projection (rank × in), lora_B the up one (out × rank): the (out, in) of the exported
    # modules are those of the modules trained
    exported = sorted((p["lora_up.weight"].shape[0], p["lora_down.weight"].shape[1]) for p in modules.values())
    assert exported == sorted(full_size["shapes"][m] for m in full_size["trained"])


def test_comfyui_maps_every_exported_name(full_size):
    mapped = comfyui_names(full_size["arch"], full_size["layers"])
    missing = sorted(set(full_size["modules"]) - mapped)
    assert not missing, f"{len(missing)} names ComfyUI would not load, e.g. {missing[:3]}"


def test_sd_scripts_maps_every_exported_name(full_size):
    names = set(full_size["modules"])
    loaded = sd_scripts_loaded(full_size["arch"], full_size["pipe"], full_size["tes"], names)
    missing = sorted(names - loaded)
    assert not missing, f"{len(missing)} names sd-scripts would drop, e.g. {missing[:3]}"


def test_a1111_maps_every_exported_name(full_size):
    modules = a1111_modules(full_size["arch"], full_size["layers"])
    missing = sorted(n for n in full_size["modules"] if a1111_module(n, modules) is None)
    assert not missing, f"{len(missing)} names A1111 would skip, e.g. {missing[:3]}"


def test_the_rules_reject_what_the_loaders_reject(full_size):
    """The rules above are not vacuous: the names the old export wrote under transformers 5
    (``lora_te1_encoder_layers_…``) and SD 1.x's ``lora_te1_`` in sd-scripts are not mapped, nor a misspelt module."""
    arch, layers = full_size["arch"], full_size["layers"]
    old = "lora_te1_encoder_layers_0_self_attn_q_proj"
    typo = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_qq"
    assert old not in comfyui_names(arch, layers) and typo not in comfyui_names(arch, layers)
    assert (
        a1111_module(old, a1111_modules(arch, layers)) is None
        and a1111_module(typo, a1111_modules(arch, layers)) is None
    )
    assert not sd_scripts_loaded(arch, full_size["pipe"], full_size["tes"], {old, typo})
    if arch == "sd15":
        assert not sd_scripts_loaded(
            arch, full_size["pipe"], full_size["tes"], {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}
        )


def test_diffusers_file_is_not_read_by_comfyui_or_a1111_for_the_unet(full_size):
    """Why docs/finetune.md sends ComfyUI and A1111 users to the kohya file: ComfyUI's rule maps none of the
    diffusers-format file's attention projections (the default --lora-targets; its diffusers names carry
    ``.processor.``), A1111's none of its UNet keys (it takes the text before the first '.', here 'unet'). Its
    text-encoder keys ComfyUI does map (under ``text_model.``, the names it knows)."""
    state = load_file(str(full_size["dir"] / WEIGHT_NAME))
    comfy = comfyui_names(full_size["arch"], full_size["layers"])
    a1111 = a1111_modules(full_size["arch"], full_size["layers"])
    unet = [k for k in state if k.startswith("unet.")]
    attention = [k for k in unet if re.search(r"\.to_(q|k|v|out\.0)\.", k)]
    assert unet and attention
    for key in attention:
        assert re.sub(r"\.(lora_[AB]|lora\.(up|down))\.weight$", "", key) not in comfy, key
    assert all(a1111_module(key.split(".", 1)[0], a1111) is None for key in unet)
    # its text-encoder keys are ComfyUI's diffusers names (text_encoder[_2].text_model.encoder.layers.<b>.<leaf>),
    # at scale 1.0: no alpha tensor, alpha / rank folded into lora_B
    clip = comfyui_clip_names(full_size["layers"])
    te_keys = {k: v for k, v in state.items() if k.startswith("text_encoder")}
    scales, not_loaded = comfyui_load(te_keys, clip)
    assert te_keys and not not_loaded and set(scales.values()) == {1.0}


def test_export_refuses_what_no_loader_maps():
    with pytest.raises(UserError, match="transformer.blocks.0.attn.to_q.lora_A.weight.*has no kohya name"):
        kohya_state({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)}, 1.0)
    with pytest.raises(UserError, match="not one the kohya loaders map"):
        kohya_state({"text_encoder.embeddings.token_embedding.lora_A.weight": torch.zeros(1)}, 1.0)


def test_sd_lora_with_text_encoder_reproduces_through_the_kohya_file(tmp_path):
    """SD 1.x with a text-encoder LoRA: the kohya file (``lora_te_text_model_…``, alpha ≠ rank) loaded by diffusers'
    own kohya loader gives the same text embeddings and noise prediction as the trained modules."""

    model = save_tiny_pipeline(tmp_path / "sd", "sd", seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    add_lora(pipe.unet, RANK, ALPHA, ["to_q", "to_k", "to_v", "to_out.0"])
    add_lora(pipe.text_encoder, RANK, ALPHA, TEXT_TARGETS)
    torch.manual_seed(1)
    for m in (pipe.unet, pipe.text_encoder):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    save_lora(tmp_path / "lora", type(pipe), pipe.unet, [pipe.text_encoder])
    export_kohya(tmp_path / "lora", ALPHA, family="sd")
    assert all(
        k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
        for k in load_file(str(tmp_path / "lora" / KOHYA_NAME))
    )

    def outputs(p):
        ids = p.tokenizer(
            ["a red apple"], padding="max_length", max_length=p.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            text = p.text_encoder(ids)[0]
            noise = p.unet(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=text).sample
        return text, noise

    tuned = outputs(pipe)
    fresh = StableDiffusionPipeline.from_pretrained(model)
    base = outputs(fresh)
    load_lora(fresh, tmp_path / "lora" / KOHYA_NAME)
    got = outputs(fresh)
    assert (tuned[0] - base[0]).abs().max() > 1e-2 and (tuned[1] - base[1]).abs().max() > 1e-2
    # lora_B went through B * alpha/rank (the diffusers file) and back (the kohya file): fp32 rounding, 1e-7 relative
    torch.testing.assert_close(got[0], tuned[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], tuned[1], atol=1e-4, rtol=1e-4)


def test_library_log_sees_a_lora_key_that_matches_no_module(sd_model, tmp_path, library_log):
    """The capture the "loads without warnings" checks rely on can fail: a LoRA whose one module is misnamed loads
    with diffusers' unexpected-keys warning, and ``library_log`` holds it."""

    pipe = StableDiffusionPipeline.from_pretrained(sd_model)
    add_lora(pipe.unet, RANK, ALPHA, ["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(tmp_path, type(pipe), pipe.unet)
    state = load_file(str(tmp_path / WEIGHT_NAME))
    wrong = sorted(k for k in state if ".attn1.to_q." in k)[0].split(".attn1.to_q.")[0] + ".attn1.to_q."
    state = {
        k.replace(wrong, wrong.replace("transformer_blocks.0", "transformer_blocks.7")): v for k, v in state.items()
    }
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with library_log() as log:
        StableDiffusionPipeline.from_pretrained(sd_model).load_lora_weights(
            str(tmp_path), weight_name="wrong.safetensors"
        )
    assert log.key_problems() and "transformer_blocks.7" in log.key_problems()[0], log.messages


def test_export_of_another_familys_file_is_one_clear_error(tmp_path):
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2),
        },
        str(tmp_path / WEIGHT_NAME),
    )
    with pytest.raises(UserError, match="covers LoRA on SD 1.x/2.x and SDXL.*'transformer'"):
        export_kohya(tmp_path, 1.0)
    assert not (tmp_path / KOHYA_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# The diffusers-format files of SD3/SD3.5 and FLUX.1 in ComfyUI (Forge: the same maps), and the trained scale.

ALPHA_FLOW, RANK_FLOW = 6.0, 2  # alpha != rank, and not a power of two: the scale must survive exactly as trained
# comfy/utils.py mmdit_to_diffusers: per joint block the fused-qkv slices and MMDIT_MAP_BLOCK's diffusers names
MMDIT_LEAVES = [
    *(f"attn.{x}" for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")),
    *(f"attn2.{x}" for x in ("to_q", "to_k", "to_v", "to_out.0")),
    "attn.to_add_out",
    *(
        "norm1.linear",
        "norm1_context.linear",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
]
# flux_to_diffusers: double blocks (img/txt qkv slices, projections, MLPs, modulations), single blocks (linear1's
# q/k/v and MLP slices, linear2, modulation)
FLUX_DOUBLE_LEAVES = [
    *(f"attn.{x}" for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")),
    *("attn.to_add_out", "norm1.linear", "norm1_context.linear"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
]
FLUX_SINGLE_LEAVES = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"]


def comfyui_transformer_names(family: str, config) -> set[str]:
    """model_lora_keys_unet's SD3 branch ("transformer." + every mmdit_to_diffusers name, depth = num_layers) or
    Flux branch ("transformer." + every flux_to_diffusers name, and the bare name: DiffSynth's format)."""
    if family == "sd3":
        keys = {f"transformer_blocks.{i}.{leaf}" for i in range(config.num_layers) for leaf in MMDIT_LEAVES}
        return {"transformer." + k for k in keys}
    keys = {f"transformer_blocks.{i}.{leaf}" for i in range(config.num_layers) for leaf in FLUX_DOUBLE_LEAVES}
    keys |= {
        f"single_transformer_blocks.{i}.{leaf}" for i in range(config.num_single_layers) for leaf in FLUX_SINGLE_LEAVES
    }
    return {"transformer." + k for k in keys} | keys


def comfyui_load(state: dict[str, torch.Tensor], names: set[str]) -> tuple[dict[str, float], set[str]]:
    """load_lora with the LoRA adapter: for each mapped name x, <x>.lora_B.weight / <x>.lora_A.weight (the
    "diffusers2" form; also lora_up/lora_down and lora.up/lora.down) with scale <x>.alpha / rank, or 1.0 without an
    alpha tensor. Returns ({name: scale}, the keys it warns 'lora key not loaded' about)."""
    loaded, scales = set(), {}
    for x in names:
        for up, down in (
            ("lora_up.weight", "lora_down.weight"),
            ("lora_B.weight", "lora_A.weight"),
            ("lora.up.weight", "lora.down.weight"),
        ):
            if f"{x}.{up}" in state:
                alpha = state.get(f"{x}.alpha")
                rank = state[f"{x}.{down}"].shape[0]
                scales[x] = float(alpha) / rank if alpha is not None else 1.0
                loaded |= {f"{x}.{up}", f"{x}.{down}", f"{x}.alpha"}
                break
    return scales, set(state) - loaded


FLOW_ARCHS = {"sd35m": "sd3", "sd35l": "sd3", "fluxdev": "flux"}


@pytest.fixture(scope="module", params=list(FLOW_ARCHS))
def flow_full_size(request, tmp_path_factory):
    """A rank-2, alpha-6 LoRA on the family's default transformer targets of the full-size SD3.5-Medium, SD3.5-Large
    or FLUX.1-dev (meta device) and on their CLIP encoders' attention and MLP, saved with ``save_lora``."""
    arch = request.param
    family = FLOW_ARCHS[arch]
    pipe = build_pipeline(arch, device="meta")
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sd3" else [])
    targets = SD3_TARGETS if family == "sd3" else FLUX_TARGETS
    states = meta_lora_states(pipe.transformer, targets, tes, RANK_FLOW, ALPHA_FLOW)
    out = tmp_path_factory.mktemp(f"lora_{arch}")
    save_lora(out, type(pipe), pipe.transformer, tes, states)
    trained = {}  # module name in the file's terms (text encoders under text_model.) -> its A and B as trained
    for part, st in zip(["transformer", "text_encoder", "text_encoder_2"], states):
        for k, v in st.items():
            module, _, kind = k.partition(".lora_")
            if part != "transformer" and not module.startswith("text_model."):
                module = "text_model." + module
            trained.setdefault(f"{part}.{module}", {})[kind.split(".")[0]] = v
    return dict(arch=arch, family=family, pipe=pipe, state=load_file(str(out / WEIGHT_NAME)), trained=trained)


def test_comfyui_loads_every_key_of_the_flow_file_at_the_trained_scale(flow_full_size):
    """ComfyUI maps every key of the SD3.5/FLUX file (transformer, fused qkv slices, SD3.5-Medium's attn2, and the
    CLIP encoders under text_model.), warns about none, and the update it adds, scale x lora_B @ lora_A, is the
    trained one, alpha / rank x B @ A: the file has no alpha tensor, so scale 1.0, with alpha / rank in lora_B."""
    pipe, state = flow_full_size["pipe"], flow_full_size["state"]
    layers = [pipe.text_encoder.config.num_hidden_layers]
    if flow_full_size["family"] == "sd3":
        layers.append(pipe.text_encoder_2.config.num_hidden_layers)
    names = comfyui_transformer_names(flow_full_size["family"], pipe.transformer.config) | comfyui_clip_names(layers)
    scales, not_loaded = comfyui_load(state, names)
    assert not not_loaded, f"{len(not_loaded)} keys ComfyUI would not load, e.g. {sorted(not_loaded)[:3]}"
    trained = flow_full_size["trained"]
    assert set(scales) == set(trained)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in state)
    if flow_full_size["arch"] == "sd35m":
        assert any(".attn2.to_q." in k for k in state)
    for module, ab in trained.items():
        scale = scales[module]
        torch.testing.assert_close(state[f"{module}.lora_A.weight"], ab["A"], atol=0, rtol=0)
        torch.testing.assert_close(
            scale * state[f"{module}.lora_B.weight"], ALPHA_FLOW / RANK_FLOW * ab["B"], atol=1e-6, rtol=1e-6
        )


def test_the_comfyui_rule_rejects_the_old_flux_clip_names_and_alpha_in_metadata_only(flow_full_size):
    """The rule is not vacuous: FLUX's CLIP-L keys as transformers 5 names them (no text_model.) load in ComfyUI 0
    of 48 ways, and a file whose lora_B carried no scale (alpha only in the metadata) loads at scale 1, not 3."""
    state = flow_full_size["state"]
    layers = [flow_full_size["pipe"].text_encoder.config.num_hidden_layers]
    old = {k.replace(".text_model.", ".", 1): v for k, v in state.items() if k.startswith("text_encoder.")}
    _, not_loaded = comfyui_load(old, comfyui_clip_names(layers))
    assert not_loaded == set(old)
    module, ab = next(iter(flow_full_size["trained"].items()))
    unscaled = {f"{module}.lora_A.weight": ab["A"], f"{module}.lora_B.weight": ab["B"]}
    scales, _ = comfyui_load(unscaled, {module})
    assert scales[module] * 1.0 != ALPHA_FLOW / RANK_FLOW


def _tiny(directory):
    return DiffusionPipeline.from_pretrained(directory)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_diffusers_loads_the_file_at_the_trained_scale_and_so_does_resume(family, tmp_path, library_log):
    """A LoRA with alpha 6, rank 2 on the denoiser and the CLIP encoders: ``load_lora_weights`` on a fresh pipeline
    warns about no key and applies every module's trained update (alpha / rank x B @ A); loading the file back into
    adapters of the same alpha (``--resume``, ``--init-lora``) gives the trained weights; the kohya export (SD/SDXL)
    holds the trained lora_up with the trained alpha."""
    saved = tmp_path / "model"
    (save_tiny_pipeline if family in ("sd", "sdxl") else save_tiny_flow_pipeline)(saved, family, seed=0)
    lora_dir = tmp_path / "lora"
    pipe = _tiny(saved)
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    targets = {"sd3": SD3_TARGETS, "flux": FLUX_TARGETS}.get(family, ["to_q", "to_k", "to_v", "to_out.0"])
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family in ("sdxl", "sd3") else [])
    add_lora(denoiser, RANK_FLOW, ALPHA_FLOW, targets)
    for te in tes:
        add_lora(te, RANK_FLOW, ALPHA_FLOW, TE_TARGETS)
    torch.manual_seed(1)
    for m in (denoiser, *tes):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
    save_lora(lora_dir, type(pipe), denoiser, tes)

    def updates(*models):
        return {
            (i, n): mod.get_delta_weight("default" if "default" in mod.lora_A else next(iter(mod.lora_A))).detach()
            for i, m in enumerate(models)
            for n, mod in m.named_modules()
            if isinstance(mod, LoraLayer)
        }

    trained = updates(denoiser, *tes)
    fresh = _tiny(saved)
    with library_log() as log:
        fresh.load_lora_weights(str(lora_dir))
    assert log.key_problems() == [], log.messages
    fresh_den = fresh.unet if family in ("sd", "sdxl") else fresh.transformer
    fresh_tes = [fresh.text_encoder] + ([fresh.text_encoder_2] if family in ("sdxl", "sd3") else [])
    loaded = updates(fresh_den, *fresh_tes)
    assert loaded.keys() == trained.keys() and len(trained) > 10
    for k, v in trained.items():
        torch.testing.assert_close(loaded[k], v, atol=1e-6, rtol=1e-5)

    again = _tiny(saved)
    again_den = again.unet if family in ("sd", "sdxl") else again.transformer
    again_tes = [again.text_encoder] + ([again.text_encoder_2] if family in ("sdxl", "sd3") else [])
    add_lora(again_den, RANK_FLOW, ALPHA_FLOW, targets)
    for te in again_tes:
        add_lora(te, RANK_FLOW, ALPHA_FLOW, TE_TARGETS)
    load_into_adapters(lora_dir, again_den, again_tes)
    for a, b in zip((denoiser, *tes), (again_den, *again_tes)):
        ours = {n: p for n, p in a.named_parameters() if "lora_" in n}
        theirs = {n: p for n, p in b.named_parameters() if "lora_" in n}
        assert ours.keys() == theirs.keys()
        for n in ours:
            torch.testing.assert_close(theirs[n], ours[n], atol=1e-6, rtol=1e-6)
    if family in ("sd", "sdxl"):
        kohya = load_file(str(export_kohya(lora_dir, ALPHA_FLOW, family=family)))
        trained_b = {n: p for n, p in denoiser.named_parameters() if "lora_B" in n}
        name, b = next(iter(trained_b.items()))
        kohya_name = "lora_unet_" + name.split(".lora_B")[0].replace(".", "_")
        assert kohya[f"{kohya_name}.alpha"].item() == ALPHA_FLOW
        torch.testing.assert_close(kohya[f"{kohya_name}.lora_up.weight"], b.detach(), atol=1e-6, rtol=1e-6)
