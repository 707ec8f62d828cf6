"""``FinetuneConfig``: every option of ``rewardtune finetune``; recipes are this dataclass on disk."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PRECISIONS, check_values, derived, option
from ..errors import UserError
from ..nonfinite import max_nonfinite_option
from ..schedules import LR_SCHEDULES
from ..sizes import hw, parse_resolution
from ..sources import REWARD_SOURCES, source_option

SEED_MAX = 2**63 - 1  # torch generators take 64 bits; the evaluation adds an offset
METHODS = ("draft-k", "draft-lv", "refl", "alignprop")
REWARD_LOSSES = ("reward", "hinge")  # --loss; computed by losses.reward_loss


@dataclass
class FinetuneConfig:
    model: str = option(
        "sd15",
        "diffusion model: alias sd15, sd21, sdxl, sd3-medium, sd35-medium, sd35-large, sd35-large-turbo, "
        "flux-dev, flux-schnell, qwen-image, flux2-dev, flux2-klein-4b, flux2-klein-9b, flux2-klein-base-4b, "
        "flux2-klein-base-9b, z-image-turbo, z-image, wan21-t2v-1.3b, wan22-ti2v-5b, wan21-t2v-14b or "
        "wan22-t2v-a14b, a diffusers-format directory, or a hub id",
    )
    defaults_from: str = option(
        "",
        "take an alias's defaults (steps, guidance, ...) for a local copy of that model, e.g. "
        "sd35-large-turbo (a local directory otherwise gets its family's)",
    )
    reward: str = option(
        "icthp", "training reward: a registry name (icthp, ict, hp, pickscore, ...) or a mix 'ict:1.0,hp:0.5'"
    )
    prompts: str = option(
        "builtin:simple",
        "training prompts: a text file (one prompt a line) or builtin:NAME (simple, animals, detailed)",
    )
    output: str = option("", "output directory (LoRA, config.yaml, checkpoints, logs, sample grids, summary.json)")
    method: str = option(
        "draft-k",
        "draft-k: gradients through the last K steps; draft-lv: K=1 plus re-noised final-step "
        "samples; refl: stop at a random step and predict x0; alignprop: K drawn in --k-min..--k",
        choices=list(METHODS),
    )
    k: int | None = option(
        None,
        "denoising steps that carry gradients (draft-k; default 1), or the largest K drawn (alignprop; "
        "default all --sample-steps)",
        min=1,
    )
    k_min: int | None = option(None, "alignprop: the smallest K drawn (default 1)", min=1)
    alignprop_draw: str = option(
        "batch",
        "alignprop: draw K once per batch (AlignProp's 2024 code) or for each sample (each sample's own "
        "truncation point; the batch runs the largest K drawn)",
        choices=["batch", "sample"],
    )
    lv_samples: int = option(2, "draft-lv: extra samples re-noised from the final step and denoised again", min=0)
    refl_min: float = option(0.7, "refl: earliest stop, as a fraction of --sample-steps")
    refl_max: float = option(1.0, "refl: latest stop, as a fraction of --sample-steps")
    steps: int = option(1000, "optimizer steps", min=1)
    batch_size: int = option(1, "prompts per process per micro-batch", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(2e-4, "AdamW learning rate of the LoRA weights", min=0)
    lr_schedule: str = option(
        "constant", "lr after warmup: constant, or linear/cosine decay to 0 at --steps", choices=list(LR_SCHEDULES)
    )
    warmup_steps: int = option(0, "linear lr warmup steps", min=0)
    weight_decay: float = option(1e-2, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)", min=0)
    lora_rank: int = option(8, "LoRA rank", min=1)
    lora_alpha: float = option(8.0, "LoRA alpha (the update is scaled by alpha/rank)")
    lora_targets: list | None = option(
        None,
        "denoiser modules that get LoRA weights (default: the family's: SD/SDXL "
        "to_q to_k to_v to_out.0; SD3 and FLUX: their attention projections, FLUX also the "
        "feed-forwards)",
    )
    train_text_encoder: bool = option(False, "also train LoRA weights on the text encoder(s) (q/k/v/out projections)")
    init_lora: str = option(
        "", "start from this LoRA (a directory with pytorch_lora_weights.safetensors) instead of zeros"
    )
    resolution: int | str = option(
        0,
        "image size in pixels, a multiple of 8: one number (a square) or HEIGHTxWIDTH, e.g. 480x832 "
        "(0 = the model's native size)",
        parse=parse_resolution,
    )
    num_frames: int | None = option(
        None,
        "video models (Wan): frames per video, 4k + 1 (default: the model's: Wan2.1 81, Wan2.2-TI2V-5B 121)",
        min=1,
    )
    frames: str = option(
        "4",
        "video models: the frames the reward scores: N, spread evenly over the video, or 'all'",
    )
    frame_aggregate: str = option(
        "mean",
        "video models: how the frames' rewards make the video's: mean, min, or weighted (--frame-weights)",
        choices=["mean", "min", "weighted"],
    )
    frame_weights: list | None = option(
        None, "video models: with --frame-aggregate weighted, one weight per scored frame (normalised to sum 1)"
    )
    guidance_scale_2: float | None = option(
        None,
        "Wan2.2-A14B: the guidance of the low-noise expert's steps (transformer_2) (default: the model's: "
        "wan22-t2v-a14b 3.0; a local directory --guidance-scale, as WanPipeline)",
    )
    lora_on: str | None = option(
        None,
        "Wan2.2-A14B: the expert(s) that carry the LoRA: high (transformer, the high-noise steps), low "
        "(transformer_2) or both (a file each: OUTPUT/pytorch_lora_weights.safetensors for transformer, "
        "OUTPUT/transformer_2/pytorch_lora_weights.safetensors for transformer_2; summary.json's 'load' has the "
        "diffusers calls) (default: the expert(s) the gradient steps run on, both where they span the boundary)",
        choices=["high", "low", "both"],
    )
    force: bool = option(
        False,
        "run even where the check before loading says the images cannot fit in memory (--resolution and "
        "--batch-size against the GPU's free or the host's available memory)",
    )
    sample_steps: int | None = option(
        None,
        "sampling steps (default: the model's: SD/SDXL 50 DDIM steps; SD3 28, "
        "SD3.5-Medium 40, SD3.5-Large 28, its Turbo 4, FLUX-dev 28, FLUX-schnell 4, Z-Image 50, its Turbo 9 Euler steps)",
        min=1,
    )
    guidance_scale: float | None = option(
        None,
        "guidance (default: the model's: SD/SDXL 7.5, SD3 7, SD3.5-Medium 4.5, "
        "SD3.5-Large 3.5 classifier-free, 1 = none; FLUX-dev 3.5 as its guidance "
        "embedding; Z-Image 4 (its pipeline 5), classifier-free from any value above 0; Turbo/schnell none)",
    )
    eta: float = option(
        0.0,
        "DDIM eta in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise; flow-matching models take none)",
        min=0,
        max=1,
    )
    max_sequence_length: int | None = option(
        None,
        "text-encoder tokens per prompt of SD3/FLUX (T5) and Z-Image (Qwen3) (default: the model's: SD3 256, "
        "FLUX-dev 512, FLUX-schnell 256, Z-Image 512)",
        min=1,
        max=512,
    )
    prompt_cache_gib: float = option(
        8.0,
        "SD3/FLUX: host memory for the cached prompt embeddings (FLUX-dev's are 4-8 MiB a prompt); the rest "
        "go to a temporary directory on disk",
        min=0,
    )
    prompt_embeddings: str = option(
        "",
        "flow models: a directory of prompt embeddings that runs share: prompts found there are not encoded "
        "again, and when all are found the large text encoder (T5, the LLM) is not even loaded; new ones are "
        "written there (rewardtune encode-prompts fills it ahead of a run)",
    )
    text_encoder_device: str = option(
        "accelerator",
        "flow models: where the large text encoder runs to fill the prompt cache; 'cpu' keeps it off the GPU "
        "altogether (slower, once per prompt)",
        choices=["accelerator", "cpu"],
    )
    quantize_text_encoder: str = option(
        "none",
        "flow models: load the large text encoder's Linear layers in 4-bit NF4 or 8-bit through bitsandbytes "
        "(its embeddings differ slightly from the full-precision ones)",
        choices=["none", "nf4", "int8"],
    )
    mixed_precision: str = option(
        "no", "no, fp16 or bf16; frozen weights in that type, LoRA weights stay fp32", choices=list(PRECISIONS)
    )
    quantize_base: str = option(
        "none",
        "load the frozen UNet/transformer weights in 4-bit NF4 or 8-bit through bitsandbytes "
        "(QLoRA-style: LoRA weights stay fp32; CUDA only), for cards where the bf16 base does not fit",
        choices=["none", "nf4", "int8"],
    )
    vae_fp32: bool = option(False, "keep the VAE in fp32 under fp16/bf16 (SDXL's VAE overflows in fp16)")
    reward_offload: bool = option(
        False,
        "keep the reward models (and --eval-reward's) in CPU memory outside their own passes: each step moves them to "
        "the GPU to score the images and take the reward's gradient, then back before the decode's and the "
        "denoiser's backward (saves their weights, about 3.7 GiB for ICT-HP's two ViT-H-14 towers in bf16, for "
        "two host-device copies of them a step)",
    )
    gradient_checkpointing: bool = option(
        True, "checkpoint the denoiser's blocks (UNet or transformer) and the VAE decode (less memory, more compute)"
    )
    checkpoint_calls: bool = option(
        True,
        "checkpoint each whole denoising call on the gradient steps but the last: only "
        "its inputs are kept and it is recomputed in the backward pass, so memory stays flat "
        "in K (--gradient-checkpointing still checkpoints the model's blocks inside it)",
    )
    compile: bool = option(
        False,
        "compile the denoiser with torch.compile (inductor) for the sampling and gradient steps: the "
        "first steps pay the compilation (minutes), the later ones run faster; needs a C++ compiler on "
        "the CPU, Triton on a GPU",
    )
    attention: str = option(
        "sdpa", "attention kernels: sdpa (PyTorch) or xformers (if installed)", choices=["sdpa", "xformers"]
    )
    optimizer: str = option("adamw", "adamw, or adamw8bit (bitsandbytes)", choices=["adamw", "adamw8bit"])
    reg_weight: float = option(
        0.0,
        "weight of the penalty on the distance between the LoRA and base model's noise "
        "predictions on the gradient steps (0 = off)",
        min=0,
    )
    loss: str = option(
        "reward",
        "reward: loss = -mean reward; hinge: ImageReward's ReFL loss, mean relu(--hinge-margin - reward)",
        choices=list(REWARD_LOSSES),
    )
    hinge_margin: float = option(2.0, "hinge: the reward above which a sample adds no loss (ReFL: 2)")
    loss_scale: float = option(1.0, "the reward loss (not the regularisers) is multiplied by this (ReFL: 1e-3)", min=0)
    pretrain_data: str = option(
        "",
        "regularise with the denoising loss on real images and captions (ImageReward's ReFL): a directory of "
        "images with same-named .txt captions, or with a metadata.jsonl of file_name/text lines; SD/SDXL only",
    )
    pretrain_weight: float = option(1.0, "weight of the --pretrain-data denoising loss", min=0)
    reward_split_every: int = option(
        10,
        "every N steps (those also logged by --log-every) log how much of a product reward's gradient comes "
        "from each factor (ICT-HP: ICT and HP), for one micro-batch, at the cost of one reward forward and two "
        "backward passes; 0 = never",
        min=0,
    )
    seed: int = option(
        0, "random seed (prompts order, initial noise, truncation draws); 0 to 2^63-1", min=0, max=SEED_MAX
    )
    resume: bool = option(
        False,
        "continue the run in OUTPUT from its newest intact checkpoint (with none yet: start "
        "from the beginning; a finished run: train on to a larger --steps)",
    )
    overwrite: bool = option(
        False, "replace a finished run or a run in progress in OUTPUT (its checkpoints, logs and LoRA)"
    )
    trust_pickle: bool = option(
        False,
        "allow resuming a checkpoint whose state is pickled (written under FSDP/DeepSpeed "
        "or before 0.1); a pickle can run code",
    )
    checkpoint_every: int = option(100, "save a resumable checkpoint every N steps (0 = only at the end)", min=0)
    checkpoint_minutes: float = option(
        0.0,
        "also save a checkpoint when this many minutes have passed since the last one "
        "(0 = off), so a killed run loses at most that much",
        min=0,
    )
    checkpoints_keep: int = option(2, "how many checkpoints to keep", min=1)
    eval_every: int = option(
        100, "evaluate (reward, eval reward, sample grid) every N steps (0 = only before and after)", min=0
    )
    eval_prompts: str = option(
        "", "evaluation prompts: a file or builtin:NAME (default: the first --eval-size training prompts)"
    )
    eval_size: int = option(4, "number of evaluation prompts (one image each)", min=1)
    eval_reward: str = option("", "held-out reward logged at each evaluation, e.g. pickscore while training on icthp")
    early_stop_drop: float = option(
        0.0, "stop when the eval reward falls more than this below its best (0 = never)", min=0
    )
    eval_seeds: int = option(
        2,
        "noise seeds rendered per evaluation prompt: the metrics and grids use the first, the hacking monitors all "
        "(two or more measure how alike one prompt's images are across seeds)",
        min=1,
    )
    stop_on_hacking: bool = option(
        False,
        "when a hacking monitor passes its threshold, end the run and keep the LoRA of the last evaluation before "
        "(without it: a warning, once per monitor)",
    )
    monitor_saturation: float = option(
        0.1, "hacking monitor: trip when mean colour saturation rises more than this above the base's (0 = off)", min=0
    )
    monitor_seed_similarity: float = option(
        0.1,
        "hacking monitor: trip when the mean cosine similarity of one prompt's images across seeds rises more than "
        "this above the base's (0 = off)",
        min=0,
    )
    monitor_prompt_similarity: float = option(
        0.1,
        "hacking monitor: trip when the mean cosine similarity of different prompts' images rises more than this "
        "above the base's (0 = off)",
        min=0,
    )
    monitor_hf_energy: float = option(
        1.5,
        "hacking monitor: trip when the checkerboard share of fine detail exceeds this many times the base's "
        "(grid artifacts; 0 = off)",
        min=0,
    )
    monitor_eval_reward: float = option(
        0.5,
        "hacking monitor: trip when the eval reward falls more than this many base standard deviations (of its "
        "per-image values) below the base's (0 = off)",
        min=0,
    )
    monitor_temporal_consistency: float = option(
        0.1,
        "hacking monitor (video models): trip when the mean cosine similarity of consecutive frames falls more than "
        "this below the base's (flicker; 0 = off)",
        min=0,
    )
    max_nonfinite: int = max_nonfinite_option()
    log_every: int = option(1, "log training scalars every N steps", min=1)
    export: str = option(
        "none",
        "also write the LoRA in another format: kohya (SD/SDXL for ComfyUI / A1111), comfyui (Wan: ComfyUI's own "
        "names, <LoRA file>_comfyui.safetensors beside each LoRA file)",
        choices=["none", "kohya", "comfyui"],
    )
    # reward sources: one field per key of sources.REWARD_SOURCES, in its order
    ict: str = source_option("ict")
    hp: str = source_option("hp")
    backbone: str = source_option("backbone")
    clip: str = source_option("clip")
    pickscore: str = source_option("pickscore")
    hpsv2: str = source_option("hpsv2")
    aesthetic: str = source_option("aesthetic")
    imagereward: str = source_option("imagereward")
    imagereward_tokenizer: str = source_option("imagereward_tokenizer")
    hpsv3: str = source_option("hpsv3")
    qwen2vl: str = source_option("qwen2vl")

    def reward_sources(self) -> dict:
        """The reward source options that were given, as ``load_reward`` keyword arguments."""
        return {k: getattr(self, k) for k in REWARD_SOURCES if getattr(self, k)}

    def validate(self) -> FinetuneConfig:
        """Check values that need no files; raise ``UserError`` naming the flag."""
        if not self.output:
            raise UserError("--output is required: the directory the LoRA, logs and checkpoints go to")
        check_values(self)
        from ..rewards import canonical_spec  # noqa: PLC0415 - here: the config (and --help) imports no torch

        # aliases written as what they stand for (hpsv2 -> hpsv2.1): config.yaml names the reward a run used
        self.reward = canonical_spec(self.reward)
        if self.eval_reward:
            self.eval_reward = canonical_spec(self.eval_reward)
        self.resolution = parse_resolution(self.resolution)
        if self.resolution and any(side < 8 or side % 8 for side in hw(self.resolution)):
            raise UserError(
                f"--resolution must be a positive multiple of 8 (or 0 for the model's native size), got {self.resolution}"
            )
        from .video import parse_frames  # noqa: PLC0415 (no torch at import)

        parse_frames(self.frames, self.frame_aggregate, self.frame_weights)
        self._resolve_k()
        if self.sample_steps is not None and self.k is not None and self.k > self.sample_steps:
            raise UserError(
                f"--k {self.k} is more than --sample-steps {self.sample_steps}; gradients can flow through at most every step"
            )
        if not 0 <= self.refl_min <= self.refl_max <= 1:
            raise UserError(
                f"--refl-min/--refl-max must satisfy 0 <= min <= max <= 1, got {self.refl_min}, {self.refl_max}"
            )
        if self.method == "alignprop" and self.k is not None and self.k_min is not None and self.k_min > self.k:
            raise UserError(f"--k-min {self.k_min} is more than --k {self.k}; AlignProp draws K in --k-min..--k")
        if self.lora_targets is not None and not self.lora_targets:
            raise UserError("--lora-targets is empty; name the UNet modules to adapt, e.g. to_q to_k to_v to_out.0")
        return self

    def _resolve_k(self) -> None:
        """--k's per-method default, filled in place once known: DRaFT-K's K is 1; AlignProp's is all sampling
        steps (known once --sample-steps is, maybe from the model). An unset --k-min stays None (AlignProp: 1)."""
        if self.k_min is not None and self.method != "alignprop":
            raise UserError(f"--k-min applies to --method alignprop only (the method is {self.method}); drop it")
        if self.k is None:
            self.k = self.sample_steps if self.method == "alignprop" else 1


# the options shared with finetune; their help, choices and ranges are FinetuneConfig's
SHARED_WITH_ENCODE = ("model", "prompts", "eval_prompts", "eval_size", "max_sequence_length", "defaults_from", "mixed_precision",
          "quantize_text_encoder", "text_encoder_device")  # fmt: skip


@dataclass
class EncodePromptsConfig:
    """The options of ``rewardtune encode-prompts``."""

    ERROR_PREFIX = "encode-prompts: "

    output: str = option("", "the --prompt-embeddings directory to fill (shared by later finetune runs)")
    model: str = derived(FinetuneConfig, "model")
    prompts: str = derived(FinetuneConfig, "prompts")
    eval_prompts: str = derived(FinetuneConfig, "eval_prompts")
    eval_size: int = derived(FinetuneConfig, "eval_size")
    max_sequence_length: int | None = derived(FinetuneConfig, "max_sequence_length")
    defaults_from: str = derived(FinetuneConfig, "defaults_from")
    mixed_precision: str = derived(FinetuneConfig, "mixed_precision")
    quantize_text_encoder: str = derived(FinetuneConfig, "quantize_text_encoder")
    text_encoder_device: str = derived(FinetuneConfig, "text_encoder_device")

    def validate(self) -> EncodePromptsConfig:
        check_values(self)
        if not self.output:
            raise UserError("encode-prompts: --output is required: the directory finetune's --prompt-embeddings names")
        return self
