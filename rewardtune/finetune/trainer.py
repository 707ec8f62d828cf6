"""``Trainer``: one optimizer step of reward fine-tuning, built from separately callable (and timeable) parts.

``step()`` is exactly: for each micro-batch, ``sample_prefix`` (no gradients) -> ``grad_steps`` (the
truncated, differentiable part) -> ``decode`` (VAE, checkpointed) -> ``score`` (the reward) ->
``backward``; then ``optimizer_step``. The reward is a black box: any ``nn.Module`` mapping images in
[0,1] and prompts to ``(B,)``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import is_fake

from .. import nonfinite, runstate
from ..config import precision_dtype
from ..errors import UserError
from ..losses import reward_loss
from ..nonfinite import NonFiniteRule, check_finite_params
from ..preflight import check_fits
from ..rewards import load_reward
from ..rundir import read_state, reset_accelerate, write_checkpoint
from ..schedules import lr_factor
from ..sizes import check_size, hw
from . import families
from . import lora as lora_mod
from .compile import check_compile, compile_denoiser
from .config import FinetuneConfig
from .defaults import check_family_options, resolve_defaults
from .models import (
    cpu_quantization_problem,
    load_pipeline,
    make_adapter,
    model_family,
    prepare_pipeline,
    resolve_model,
)
from .pretrain import denoising_loss, load_images, load_pairs, vae_encode
from .prompt_store import store_for
from .prompts import load_prompts
from .sampler import BatchNoise, SampleState, make_plan, make_sampler, small_steps_note
from .video import HostOffload, check_host_room, decode_frames, for_video


def make_accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    reset_accelerate(cfg.mixed_precision)  # a second run in this process with another precision (a notebook, a sweep)
    try:
        return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    except ValueError as exc:
        raise UserError(
            f"--mixed-precision {cfg.mixed_precision}: {str(exc).splitlines()[0][:200]} (on a CPU use bf16 or no)"
        ) from None


def check_optional_packages(cfg: FinetuneConfig) -> None:
    """Fail before loading any model when an option needs a package that is not installed."""

    if cfg.quantize_text_encoder != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"--quantize-text-encoder {cfg.quantize_text_encoder} needs bitsandbytes: pip install bitsandbytes, "
            f"or use --quantize-text-encoder none"
        )
    if cfg.quantize_base != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                f"--quantize-base {cfg.quantize_base} needs bitsandbytes: pip install bitsandbytes, "
                f"or use --quantize-base none"
            )
        if not torch.cuda.is_available():
            problem = cpu_quantization_problem(cfg.quantize_base)
            if problem is not None:
                raise UserError(
                    f"--quantize-base {cfg.quantize_base}: this bitsandbytes cannot train through its "
                    f"{cfg.quantize_base} layers on the CPU ({problem}); use a CUDA GPU or --quantize-base none"
                )
    if cfg.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes, or use --optimizer adamw")
    if cfg.compile:
        check_compile(cuda=torch.cuda.is_available())
    if cfg.attention == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise UserError(
                "--attention xformers: xformers is not installed (pip install xformers); or use --attention sdpa"
            )


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _seed(*parts) -> int:
    """A stable 63-bit seed from the parts (the same on every run, process and platform)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class LoraSet:
    """The models that carry the trained LoRA weights: the denoisers ({component: model}; one, or a pair of experts
    such as Wan2.2-A14B's), and the text encoders when they are trained."""

    denoisers: dict
    text_encoders: list = field(default_factory=list)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The first denoiser: the one the sampler is handed (the others it reaches through the conditioning)."""
        return next(iter(self.denoisers.values()))

    @property
    def modules(self) -> list:
        return [*self.denoisers.values(), *self.text_encoders]

    def files(self, family: str) -> dict:
        """{component: its LoRA file's name} (``lora.weight_name``): the family's own denoiser's is
        pytorch_lora_weights.safetensors, a further one's <component>/pytorch_lora_weights.safetensors."""
        main = families.by_name(family).denoiser
        return {name: lora_mod.weight_name(name, main) for name in self.denoisers}


def trained_denoisers(adapter) -> dict:
    """{component: model} of the denoisers that carry the LoRA: the adapter's ``trained_denoisers()`` where it has
    several to choose from (Wan2.2-A14B's experts), else its one denoiser."""
    own = getattr(adapter, "trained_denoisers", None)
    return dict(own()) if own is not None else {lora_mod.denoiser_name(adapter.denoiser): adapter.denoiser}


def load_lora_files(path, lora: LoraSet, family: str, what: str, check_only: bool = False) -> None:
    """``--init-lora`` / ``--resume``: each trained denoiser's file in ``path`` into its adapters (text encoders with
    the first), every file checked before any is loaded; a missing file is a one-line ``UserError`` naming it. A
    path to a file stands for the first denoiser's file when only one denoiser is trained."""
    files = lora.files(family)
    if Path(path).expanduser().is_file() and len(files) > 1:
        raise UserError(f"{what}: '{path}' is one file; pass the directory holding {', '.join(files.values())}")
    fits = []
    for n, (name, model) in enumerate(lora.denoisers.items()):
        tes = lora.text_encoders if n == 0 else []
        fits.append((model, tes, files[name]))
        lora_mod.adapters_fit(path, model, tes, what, files[name])
    if not check_only:
        for model, tes, name in fits:
            lora_mod.load_into_adapters(path, model, tes, what, name)


def prepare_models(cfg: FinetuneConfig, pipe, adapter, device) -> LoraSet:
    """Add the LoRA weights (``cfg.init_lora``'s values if given) to the adapter's denoiser (and text
    encoders with ``cfg.train_text_encoder``), put the models on ``device`` with frozen weights in their
    loaded precision and LoRA weights in fp32, and switch on the memory options of ``cfg``."""
    from diffusers.training_utils import cast_training_params

    denoisers = trained_denoisers(adapter)
    torch.manual_seed(_seed(cfg.seed, "lora"))  # the same initial LoRA A matrices on every run and process
    for denoiser in denoisers.values():
        lora_mod.add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    trained = []
    if cfg.train_text_encoder:
        for te in adapter.text_encoders():
            lora_mod.add_lora(te, cfg.lora_rank, cfg.lora_alpha, lora_mod.TEXT_TARGETS)
            trained.append(te)
    lora = LoraSet(denoisers, trained)
    if cfg.init_lora:
        load_lora_files(cfg.init_lora, lora, adapter.family, "--init-lora")
    for part in [*denoisers.values(), pipe.vae, *adapter.text_encoders(), *getattr(adapter, "frozen_parts", list)()]:
        part.to(device)
    if cfg.vae_fp32 and pipe.vae.dtype != torch.float32:
        with _no_empty_fp32_notice():
            pipe.vae.to(dtype=torch.float32)
    cast_training_params(lora.modules, dtype=torch.float32)
    for denoiser in denoisers.values():
        if cfg.attention == "xformers":
            denoiser.enable_xformers_memory_efficient_attention()
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
    if cfg.gradient_checkpointing:
        checkpoint_vae_decoder(pipe.vae)  # the decode with gradients, layer by layer
        for te in trained:  # transformers 5 renamed the method
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    for model in lora.modules:
        model.train()
    return lora


class _DropEmptyFp32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _no_empty_fp32_notice():
    """diffusers' ``ModelMixin.to(dtype=...)`` warns that "modules ... should be kept in float32: []" on every cast,
    also when it names none (the VAE's list is empty): no news, dropped here; a list that names modules still shows."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropEmptyFp32Notice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def checkpoint_vae_decoder(vae) -> None:
    """Gradient checkpointing of the VAE decoder one level finer than diffusers' own. diffusers checkpoints the mid
    block and each up block whole, so the backward pass recomputes an up block with all its activations alive at
    once: at 1024 px the last block's three resnets hold 128-channel full-resolution tensors (0.5 GiB each in fp32)
    by the dozen. Here every resnet, attention and upsampler inside those blocks is a checkpoint of its own as well
    (nested, non-reentrant), so a block's recomputation keeps only its layers' inputs and one layer's internals.

    A causal 3-D VAE (Wan's, Qwen-Image's; diffusers checkpoints neither) passes its layers a feature cache of earlier
    frames that each layer reads and advances in place, which a recomputation would find advanced: such a layer is a
    checkpoint of a function of its input and the cache slots it reads, returning its output and the slots it leaves
    (``_checkpointed_cached``), so the recomputation sees the cache as the forward pass did, for one latent frame or
    a video's many."""
    if vae._supports_gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    decoder = vae.decoder
    for block in [decoder.mid_block, *decoder.up_blocks]:
        layers = [getattr(block, "upsampler", None)]  # Wan 2.2's residual up blocks: one upsampler, not a list
        for name in ("resnets", "attentions", "upsamplers"):
            layers += list(getattr(block, name, None) or [])
        for layer in layers:
            if layer is not None and not getattr(layer, "_rewardtune_checkpointed", False):
                cached = "feat_cache" in inspect.signature(layer.forward).parameters
                layer.forward = (
                    _checkpointed_cached(layer.forward, cache_slots(layer), type(layer).__name__)
                    if cached
                    else _checkpointed(layer.forward)
                )
                layer._rewardtune_checkpointed = True


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def cache_slots(layer: torch.nn.Module) -> int:
    """How many slots of a causal 3-D VAE's feature cache ``layer`` reads and advances per call: one per causal
    convolution with a temporal kernel over 1 (Wan's and Qwen-Image's residual blocks 2, a temporal upsampler 1, a
    spatial one 0; the 1x1x1 shortcut convolutions are called without the cache)."""
    return sum(
        1
        for m in layer.modules()
        if isinstance(m, torch.nn.Conv3d) and type(m).__name__.endswith("CausalConv3d") and m.kernel_size[0] > 1
    )


def _checkpointed_cached(forward, slots: int, name: str):
    """A causal 3-D VAE layer ``forward(x, feat_cache, feat_idx)`` as a checkpoint of ``(x, slots read) -> (output,
    slots left)``: the forward pass runs it on a private list holding the slots at their places and writes what it
    leaves back into the caller's cache, so the backward pass recomputes it from the slots it first read (the caller's
    cache is advanced by then) and the gradients reach earlier frames through the slots. ``slots``: the layer's count
    (``cache_slots``), checked on every call."""

    def step(x, start, *held):
        cache = [None] * start + list(held)
        at = [start]
        out = forward(x, cache, at)
        if at[0] != start + slots:
            raise RuntimeError(f"{name} advanced the VAE's feature cache by {at[0] - start} slots, not {slots}")
        return (out, *cache[start:])

    def run(x, feat_cache=None, feat_idx=None):
        if feat_idx is None:
            feat_idx = [0]
        if not torch.is_grad_enabled():
            return forward(x, feat_cache, feat_idx)
        if feat_cache is None:
            return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
        start = feat_idx[0]
        out, *left = torch.utils.checkpoint.checkpoint(
            step, x, start, *feat_cache[start : start + slots], use_reentrant=False
        )
        feat_cache[start : start + slots] = left
        feat_idx[0] = start + slots
        return out

    return run


@dataclass
class TrainerParts:
    """What a Trainer is assembled from. ``lora`` holds the models as the accelerator prepared (wrapped)
    them, ``unwrapped`` the same models before wrapping (defaults to ``lora``). ``optimizer`` may be None
    for a Trainer that only runs micro-steps (the planner)."""

    pipe: object
    adapter: object
    sampler: object
    reward: torch.nn.Module
    lora: LoraSet
    accelerator: object
    optimizer: object = None
    eval_reward: torch.nn.Module | None = None
    unwrapped: LoraSet | None = None
    prompts: list[str] = field(default_factory=list)
    resolution: int = 0


class Trainer:
    """Reward fine-tuning of a diffusion model's LoRA; see the module docstring for the parts of ``step``.

    ``Trainer(cfg, ...)`` loads everything ``cfg`` names; ``Trainer.from_parts(cfg, parts)`` assembles one
    from parts built elsewhere (the planner's models on fake tensors)."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        reward: torch.nn.Module | None = None,
        eval_reward: torch.nn.Module | None = None,
        accelerator=None,
        resume_from: str | Path | None = None,
        pipe=None,
    ):
        """``resume_from``: a checkpoint directory of ``save_checkpoint`` to continue from, or a function that
        picks one given a check of its contents (``RunDir.select``). ``pipe``: an
        already built pipeline to use instead of loading ``cfg.model`` (e.g. random full-size weights).
        Options of ``cfg`` left unset (None) are filled in place with the model's defaults (``defaults``)."""
        cfg.validate()
        check_optional_packages(cfg)
        prompts = load_prompts(cfg.prompts)  # a bad prompt file fails before any model loads
        pretrain = load_pairs(cfg.pretrain_data) if cfg.pretrain_data else []  # so does a bad --pretrain-data
        eval_prompts = load_prompts(cfg.eval_prompts, "--eval-prompts")[: cfg.eval_size] if cfg.eval_prompts else []
        acc = accelerator or make_accelerator(cfg)
        dtype = precision_dtype(acc.mixed_precision)
        store = None  # --prompt-embeddings
        if pipe is not None:
            if cfg.quantize_base != "none":
                raise UserError(
                    "--quantize-base applies when loading --model; quantize the pipeline you pass in yourself"
                )
            pipe, family = prepare_pipeline(pipe)
        else:
            path = resolve_model(cfg.model)
            spec = families.by_name(model_family(path))
            store = store_for(cfg, path, spec, dtype)
            stored_all = store is not None and not store.missing([*prompts, *eval_prompts, ""])
            pipe, family = load_pipeline(
                cfg.model,
                dtype,
                check=lambda family: _check_before_loading(cfg, family, acc),
                quantize=cfg.quantize_base,
                text_encoder=cfg.quantize_text_encoder,
                without=(spec.cached_encoder,)
                if stored_all
                else (),  # every prompt stored: the encoder stays unloaded
            )
        resolve_defaults(cfg, pipe, family)
        if pretrain and families.by_name(family).flow:
            raise UserError(
                f"--pretrain-data: the denoising regulariser is written for SD/SDXL (DDPM training loss); "
                f"{family} is a flow-matching model, drop --pretrain-data"
            )
        adapter = make_adapter(pipe, family, cfg, store=store)
        resolution = cfg.resolution or adapter.native_resolution()
        check_size(adapter, resolution)
        check_host_room(adapter, cfg, acc.device, resolution)  # a video's decode checkpoints in host memory
        cfg.resolution = resolution
        lora = prepare_models(cfg, pipe, adapter, acc.device)
        params = lora_mod.trainable_parameters(*lora.modules)
        optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        if callable(resume_from):  # the newest checkpoint whose contents fit these adapters and this optimizer
            resume_from = resume_from(lambda path: self._checkpoint_problem(path, lora, optimizer, acc, family))
        if resume_from is not None:  # LoRA weights go in before accelerate wraps (and maybe shards) the models
            load_lora_files(resume_from, lora, adapter.family, f"checkpoint '{resume_from}'")
        if adapter.sampler_kind == "flow" and acc.is_main_process:  # T5 on many prompts can take minutes
            print(f"finetune: encoding {len(prompts) + len(eval_prompts)} prompts once", flush=True)
        with acc.autocast():  # flow families: the prompt set's embeddings once, then T5 leaves the accelerator
            adapter.cache_prompts(prompts + eval_prompts)
        home = torch.device("cpu") if cfg.reward_offload else acc.device  # --reward-offload: moved in to score
        reward = _frozen(reward if reward is not None else _load_reward(cfg.reward, cfg, dtype), home)
        if eval_reward is not None or cfg.eval_reward:
            eval_reward = _frozen(
                eval_reward if eval_reward is not None else _load_reward(cfg.eval_reward, cfg, dtype), home
            )
        reward, eval_reward = for_video(reward, adapter, cfg), for_video(eval_reward, adapter, cfg)  # video: frames
        prepared = acc.prepare(*lora.modules, optimizer)  # each denoiser (expert) a wrapper of its own
        if cfg.compile:
            for denoiser in lora.denoisers.values():
                compile_denoiser(denoiser)
        sampler = make_sampler(
            adapter.sampler_kind, pipe.scheduler, cfg, dtype, adapter=adapter, resolution=resolution
        )
        parts = TrainerParts(
            pipe,
            adapter,
            sampler,
            reward,
            LoraSet(dict(zip(lora.denoisers, prepared)), list(prepared[len(lora.denoisers) : -1])),
            acc,
            optimizer=prepared[-1],
            eval_reward=eval_reward,
            unwrapped=lora,
            prompts=prompts,
            resolution=resolution,
        )
        self._assemble(cfg, parts)
        note = small_steps_note(sampler, cfg.method, cfg.k)
        if note and getattr(acc, "is_main_process", True):
            print(note, flush=True)
        self.pretrain_pairs = pretrain
        self.resume_state = self._load_checkpoint(Path(resume_from)) if resume_from is not None else {}

    @classmethod
    def from_parts(cls, cfg: FinetuneConfig, parts: TrainerParts) -> Trainer:
        """A Trainer over already built parts: no files read, nothing prepared or moved."""
        trainer = cls.__new__(cls)
        trainer._assemble(cfg, parts)
        trainer.resume_state = {}
        return trainer

    def _assemble(self, cfg: FinetuneConfig, parts: TrainerParts) -> None:
        self.cfg = cfg
        self.accelerator, self.device = parts.accelerator, parts.accelerator.device
        self.weight_dtype = precision_dtype(parts.accelerator.mixed_precision)
        self.pipe, self.adapter, self.family, self.sampler = (
            parts.pipe,
            parts.adapter,
            parts.adapter.family,
            parts.sampler,
        )
        self.prompts = parts.prompts
        self.resolution = parts.resolution or cfg.resolution or parts.adapter.native_resolution()
        unwrapped = parts.unwrapped or parts.lora
        self.unet, self.trained_text_encoders = unwrapped.denoiser, unwrapped.text_encoders  # the LoRA'd models
        self.unet_train, self.models_train = parts.lora.denoiser, parts.lora.modules  # as the accelerator wrapped them
        self.lora_set, self.lora_unwrapped = parts.lora, unwrapped
        # what the sampler calls: the denoiser, or {component: wrapped} for several (the conditioning calls the one
        # each step's timestep picks, through its own wrapper)
        self.model_train = parts.lora.denoiser if len(parts.lora.denoisers) == 1 else dict(parts.lora.denoisers)
        self.reward, self.eval_reward, self.optimizer = parts.reward, parts.eval_reward, parts.optimizer
        self.lr_factor = lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
        self.global_step = 0
        self.pretrain_pairs: list = []  # (image, caption) pairs of --pretrain-data
        self.micro_metrics: list[dict] = []  # what each micro-step of the current step measured (loss terms, ...)
        say = (lambda line: print(line, flush=True)) if getattr(parts.accelerator, "is_main_process", True) else None
        self.nonfinite = NonFiniteRule(cfg.max_nonfinite, "finetune: ", say)
        # a video decode's per-frame checkpoints keep their inputs and causal caches in host memory until the
        # backward pass on an accelerator (video.HostOffload); on a CPU host and device are one
        self.decode_host = HostOffload() if self.device.type != "cpu" else None

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient, in the whole run."""
        return self.nonfinite.skipped

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self.nonfinite.skipped = n

    # ----- data and randomness (a function of the step, so a resumed run sees the same) ---------
    def batch_prompts(self, micro: int = 0, step: int | None = None) -> list[str]:
        """The prompts of this process's micro-batch: an epoch-wise shuffle of the prompt list."""
        step = self.global_step if step is None else step
        return [self.prompts[i] for i in self._epoch_slice(len(self.prompts), "epoch", micro, step)]

    def _epoch_slice(self, n: int, name: str, micro: int, step: int) -> list[int]:
        """Indices into ``n`` items for this process's micro-batch: an epoch-wise shuffle seeded by (seed, name)."""
        acc, b = self.accelerator, self.cfg.batch_size
        start = ((step * self.cfg.grad_accum + micro) * acc.num_processes + acc.process_index) * b
        out = []
        for idx in range(start, start + b):
            epoch, pos = divmod(idx, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, name, epoch)))
            out.append(int(perm[pos]))
        return out

    def batch_noise(self, micro: int = 0, step: int | None = None) -> BatchNoise:
        """The randomness of this micro-batch (``sampler.BatchNoise``): one generator for the global batch (the same
        on every process), of which this process keeps its rows, and a plan generator of its own."""
        step = self.global_step if step is None else step
        acc, b = self.accelerator, self.cfg.batch_size
        # (the trailing 0 keeps the key single-process runs had when each process drew its own noise)
        noise = torch.Generator().manual_seed(_seed(self.cfg.seed, "noise", step, micro, 0))
        plan = torch.Generator().manual_seed(_seed(self.cfg.seed, "plan", step, micro))
        return BatchNoise(noise, total=b * acc.num_processes, start=b * acc.process_index, plan=plan)

    # ----- the parts of a step ----------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.adapter.latent_shape(self.resolution)

    def encode(self, prompts: list[str]):
        """The UNet's conditioning; differentiable when text-encoder LoRA is trained."""
        ctx = contextlib.nullcontext() if self.trained_text_encoders else torch.no_grad()
        with ctx, self.accelerator.autocast():
            return self.adapter.encode(prompts, self.sampler.guided, hw(self.resolution))

    def sample_prefix(self, prompts: list[str], noise: BatchNoise | torch.Generator) -> SampleState:
        """Encode, draw the initial noise and the truncation plan (for the global batch, keeping this process's
        rows), and denoise without gradients up to the first step that carries them."""
        cfg, noise = self.cfg, BatchNoise.of(noise)
        latents = self.sampler.initial_latents((len(prompts), *self.latent_shape), noise, self.device)
        plan = make_plan(
            cfg.method,
            cfg.sample_steps,
            noise.total or len(prompts),
            noise.plan,
            cfg.k,
            cfg.lv_samples,
            (cfg.refl_min, cfg.refl_max),
            k_min=cfg.k_min or 1,
            per_sample=cfg.alignprop_draw == "sample",
        ).rows(noise.start, len(prompts))
        state = SampleState(latents, self.encode(prompts), plan, 0, noise, list(prompts))
        with self.accelerator.autocast():
            return self.sampler.run_prefix(self.model_train, state)

    def grad_steps(self, state: SampleState):
        """The denoising steps with gradients: (latents, regulariser, prompts per latent)."""
        base = self._base_unet if self.cfg.reg_weight > 0 else None
        with self.accelerator.autocast():
            return self.sampler.run_grad(self.model_train, state, base_unet=base)

    @property
    def _base_unet(self):
        """The denoiser(s) with the LoRA switched off (the base model), for the regulariser, in the form of
        ``model_train`` (called without gradients, through the wrapped models so sharded weights are gathered)."""
        if isinstance(self.model_train, dict):
            return {name: functools.partial(self._base_call, model) for name, model in self.model_train.items()}
        return functools.partial(self._base_call, self.unet_train)

    def _base_call(self, model, *args, **kwargs):
        with _adapters_disabled(*self._unwrapped_denoisers()):
            return model(*args, **kwargs)

    def _unwrapped_denoisers(self) -> list:
        return [self.accelerator.unwrap_model(m) for m in self.lora_set.denoisers.values()]

    def decode(self, latents: torch.Tensor, all_frames: bool = False) -> torch.Tensor:
        """Latents -> images (B,3,H,W) in [0,1], differentiable; under gradient checkpointing the VAE
        decoder recomputes its blocks in the backward pass instead of keeping their activations. A video family:
        videos (B,3,F,H,W), up to the last frame the reward scores (``all_frames``: every frame; video.py)."""
        vae = self.pipe.vae
        z = self.adapter.vae_latents(latents).to(vae.dtype)
        ctx = (
            torch.autocast(self.device.type, enabled=False)
            if vae.dtype == torch.float32
            else self.accelerator.autocast()
        )
        video = getattr(self.adapter, "video", False)
        with ctx:
            if video:
                last = None if all_frames or not hasattr(self.reward, "indices") else max(self.reward.indices)
                images = decode_frames(
                    vae,
                    z,
                    last,
                    self.adapter.temporal_factor,
                    checkpointed=self.cfg.gradient_checkpointing,
                    host=self.decode_host,
                )
            else:
                images = vae.decode(z, return_dict=False)[0]
        if images.dim() == 5 and not video:  # a video VAE (Qwen-Image's): (B, C, frames, H, W), one frame
            images = images[:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _place_rewards(self, on: bool, *models) -> None:
        """Move the reward models (all of them by default) to the accelerator (``on``) or to CPU memory (the
        planner counts this instead)."""
        for m in models or (self.reward, self.eval_reward):
            if m is not None:
                m.to(self.device if on else torch.device("cpu"))

    @contextlib.contextmanager
    def rewards_placed(self, *models):
        """With --reward-offload, the reward models (``models``, or all) on the accelerator for the block and back in
        CPU memory after it; without it, nothing moves (they live on the accelerator)."""
        if not self.cfg.reward_offload:
            yield
            return
        self._place_rewards(True, *models)
        try:
            yield
        finally:
            self._place_rewards(False, *models)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.reward(images, prompts).float()

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss``; a non-finite loss is replaced by a zero loss over the trainable
        weights (so every process still takes part in the gradient all-reduce). Returns finiteness.
        A fake tensor (the planner's trace) has no values and counts as finite."""
        params = lora_mod.trainable_parameters(*self.models_train)
        return nonfinite.backward(self.accelerator, loss, params, finite=True if is_fake(loss) else None)

    def optimizer_step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip, step and zero the gradients (``nonfinite.optimizer_step``); ``skip`` (a non-finite loss on
        some process) or a non-finite gradient drops this step's update. Returns (the gradient norm before
        clipping, NaN when skipped or not known; whether the update was applied)."""
        for group in self.optimizer.param_groups:  # from the step counter, so a resumed run needs no state
            group["lr"] = self.cfg.lr * self.lr_factor(self.global_step)
        params = lora_mod.trainable_parameters(*self.models_train)
        return nonfinite.optimizer_step(self.accelerator, self.optimizer, params, self.cfg.max_grad_norm, not skip)

    def micro_step(self, prompts: list[str], noise: BatchNoise | torch.Generator, on_part=None):
        """One micro-batch: ``sample_prefix`` -> ``grad_steps`` -> ``decode`` -> ``score`` (-> ``pretrain_loss``
        with --pretrain-data) -> ``backward``. Returns (rewards (B,), regulariser, finite), detached; the loss and
        its other terms go to ``micro_metrics``. ``on_part(name)`` is called as each part starts and with None
        at the end (the planner counts memory per part, the benchmark times them)."""
        cfg, mark = self.cfg, on_part or (lambda name: None)
        micro, step = len(self.micro_metrics), self.global_step
        mark("sample_prefix")
        state = self.sample_prefix(prompts, noise)
        mark("grad_steps")
        latents, reg, prompts_out = self.grad_steps(state)
        mark("decode")
        images = self.decode(latents)
        mark("reward")
        measured = {}
        if cfg.reward_offload:
            r, images, loss = self._offloaded_reward(images, prompts_out, micro, step, measured, mark)
            loss = loss + cfg.reg_weight * reg
        else:
            r = self.score(images, prompts_out)
            loss = cfg.loss_scale * reward_loss(r, cfg.loss, cfg.hinge_margin) + cfg.reg_weight * reg
            if micro == 0 and self._split_step(step + 1):
                with self.accelerator.autocast():
                    measured.update(self.reward.gradient_split(images.detach(), prompts_out))
        del images  # the graph keeps what backward needs
        if self.pretrain_pairs and cfg.pretrain_weight > 0:
            mark("pretrain")
            pre = self.pretrain_loss(micro, step)
            loss = loss + cfg.pretrain_weight * pre
            measured["pretrain"] = pre.detach()
        measured["loss"] = loss.detach()
        self.micro_metrics.append(measured)
        mark("backward:decode" if cfg.reward_offload else "backward")
        finite = self.backward(loss)
        mark(None)
        return r.detach(), reg.detach(), finite

    def _offloaded_reward(self, images, prompts, micro: int, step: int, measured: dict, mark):
        """--reward-offload: the reward's forward and its backward to the images with the reward on the accelerator,
        then the reward leaves, and the rest of the backward pass takes that gradient: ``images · g`` has the
        gradient ``g`` with respect to the images, so the decode's and the denoiser's gradients are the ones of the
        reward loss itself. Returns (rewards, the images (for ``del``), the loss to backpropagate, whose value is the
        reward loss's). Under fp16 the reward's gradient is taken at the loss scale of accelerate's gradient scaler,
        as the one backward pass would take it."""
        cfg = self.cfg
        leaf = images.detach().requires_grad_(images.requires_grad)
        with self.rewards_placed(self.reward):
            r = self.score(leaf, prompts)
            reward_term = cfg.loss_scale * reward_loss(r, cfg.loss, cfg.hinge_margin)
            if micro == 0 and self._split_step(step + 1):
                with self.accelerator.autocast():
                    measured.update(self.reward.gradient_split(leaf.detach(), prompts))
            mark("backward:reward")
            scaler = getattr(self.accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            if leaf.requires_grad:
                grad = torch.autograd.grad(reward_term * scale, leaf)[0] / scale
            else:
                grad = torch.zeros_like(leaf)
        # images * grad has the reward loss's gradient with respect to the images; plus a constant, its value too
        surrogate = (images * grad.to(images.dtype)).sum()
        return r, images, surrogate + (reward_term.detach() - surrogate.detach())

    def _split_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) measures the reward's gradient split (--reward-split-every,
        on a logged step), for a reward that can (``gradient_split``: ICT-HP)."""
        every = self.cfg.reward_split_every
        return (
            every > 0
            and step % every == 0
            and step % self.cfg.log_every == 0
            and hasattr(self.reward, "gradient_split")
        )

    def pretrain_generator(self, micro: int = 0, step: int | None = None) -> torch.Generator:
        """The random draws of the pretrain loss (VAE sample, noise, timesteps), a function of the step."""
        step = self.global_step if step is None else step
        return torch.Generator().manual_seed(
            _seed(self.cfg.seed, "pretrain", step, micro, self.accelerator.process_index)
        )

    def pretrain_batch(self, micro: int = 0, step: int | None = None) -> list:
        """This process's (image, caption) pairs of --pretrain-data for a micro-batch (an epoch-wise shuffle)."""
        step = self.global_step if step is None else step
        return [self.pretrain_pairs[i] for i in self._epoch_slice(len(self.pretrain_pairs), "pretrain", micro, step)]

    def pretrain_loss(self, micro: int = 0, step: int | None = None) -> torch.Tensor:
        """ImageReward's regulariser: SD's denoising loss (``pretrain.denoising_loss``) with the LoRA on, on a
        micro-batch of real images (VAE-encoded at the training resolution) and their captions. Draws from
        ``pretrain_generator``, in order: the VAE posterior sample, the noise, the timesteps."""
        pairs = self.pretrain_batch(micro, step)
        gen = self.pretrain_generator(micro, step)
        vae, scheduler = self.pipe.vae, self.pipe.scheduler
        pixels = load_images([path for path, _ in pairs], self.resolution).to(self.device, vae.dtype)
        latents = vae_encode(vae, pixels, gen).float()
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pairs),), generator=gen)
        cond = self._encode_unguided([caption for _, caption in pairs])
        with self.accelerator.autocast():
            return denoising_loss(
                self.unet_train, cond, scheduler, latents, noise, timesteps.to(self.device), self.weight_dtype
            )

    def _encode_unguided(self, prompts: list[str]):
        ctx = contextlib.nullcontext() if self.trained_text_encoders else torch.no_grad()
        with ctx, self.accelerator.autocast():
            return self.adapter.encode(prompts, False, hw(self.resolution))

    def _step_metrics(self) -> dict:
        """The micro-steps' ``micro_metrics`` of this step, averaged (over micro-steps and processes), then cleared."""
        acc, rows, self.micro_metrics = self.accelerator, self.micro_metrics, []
        keys = sorted({k for row in rows for k in row})
        return {
            k: float(acc.reduce(torch.stack([torch.as_tensor(r[k]).float() for r in rows if k in r]).mean(), "mean"))
            for k in keys
        }

    def step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        cfg, acc = self.cfg, self.accelerator
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        rewards, regs, finite, prompts = [], [], True, []
        for micro in range(cfg.grad_accum):
            batch = self.batch_prompts(micro)
            prompts += batch
            with acc.accumulate(*self.models_train):
                r, reg, ok = self.micro_step(batch, self.batch_noise(micro))
                finite &= ok
                rewards.append(r.mean())
                regs.append(reg)
        norm, applied = self.optimizer_step(skip=not nonfinite.all_agree(acc, finite))
        self._count(applied)
        self.global_step += 1
        reward = acc.reduce(torch.stack(rewards).mean().float(), "mean")
        return {
            "step": self.global_step,
            **self._step_metrics(),  # loss, and the pretrain loss and reward split where measured
            "reward": float(reward),
            "reg": float(acc.reduce(torch.stack(regs).mean().float(), "mean")),
            "grad_norm": norm,
            "step_time": time.perf_counter() - start,
            "peak_memory_mb": peak_memory_mb(self.device),
            "skipped": not applied,
            "lr": self.optimizer.param_groups[0]["lr"],
            "prompts": _per_process(acc, prompts),
        }

    def _count(self, applied: bool) -> None:
        """The shared ``--max-nonfinite`` rule (``nonfinite.NonFiniteRule``), with a hint for this model."""
        hint = "try --mixed-precision bf16" if self.weight_dtype == torch.float16 else "try a lower --lr"
        spec = families.by_name(self.family)
        if spec.fp16_vae_overflows and not self.cfg.vae_fp32 and self.weight_dtype != torch.float32:
            hint += f" or --vae-fp32 ({spec.label}'s VAE overflows in fp16)"
        self.nonfinite.count(applied, self.global_step + 1, hint)

    def lora_digests(self) -> list[str]:
        """The sha256 of the trained LoRA weights on each process (every process must call it): under data
        parallelism they must all be equal, since every process applies the same averaged gradients. Sharded
        runs (FSDP, DeepSpeed) hold different parts on each process: an empty list."""
        if runstate.is_sharded(self.accelerator):
            return []
        h = hashlib.sha256()
        for p in lora_mod.trainable_parameters(*self.models_train):
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return _per_process(self.accelerator, h.hexdigest())

    # ----- generation for evaluation ----------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, lora: bool = True) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] from the full sampler without gradients; ``lora=False`` uses the base model.
        Under several processes every process must call it (sharded models run their forward together)."""
        unet, b = self.model_train, self.cfg.batch_size
        noise = BatchNoise(torch.Generator().manual_seed(seed))  # drawn for all prompts at once, as the pipeline does
        ctx = (
            contextlib.nullcontext()
            if lora
            else _adapters_disabled(*self._unwrapped_denoisers(), *self.trained_text_encoders)
        )
        with ctx:
            latents = self.sampler.initial_latents((len(prompts), *self.latent_shape), noise, self.device)
            conds = [self.encode(prompts[i : i + b]) for i in range(0, len(prompts), b)]
            with self.accelerator.autocast():  # the model runs --batch-size prompts at a time
                latents = self.sampler.sample(unet, conds, latents, noise, chunk=b)
            return torch.cat([self.decode(latents[i : i + b], all_frames=True) for i in range(0, len(prompts), b)])

    # ----- LoRA and checkpoints ----------------------------------------------------------------
    def lora_models(self):
        """(the first trained denoiser, the trained text encoders), unwrapped."""
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.unet_train), [unwrap(m) for m in self.lora_set.text_encoders]

    def lora_files(self) -> dict:
        """{component: file name} of the LoRA this run writes, one file per trained denoiser (``LoraSet.files``)."""
        return self.lora_set.files(self.family)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the LoRA in diffusers format, a file per trained denoiser (text encoders in the first one's); every
        process must call it (weights are gathered), the main one writes. Returns the first file's path."""
        acc = self.accelerator
        check_finite_params(
            acc, lora_mod.trainable_parameters(*self.models_train), f"the LoRA to be saved in '{directory}'"
        )
        unwrap, files = acc.unwrap_model, self.lora_files()
        tes = [unwrap(m) for m in self.lora_set.text_encoders]
        te_states = [acc.get_state_dict(m) for m in self.lora_set.text_encoders]
        paths = []
        for n, (name, model) in enumerate(self.lora_set.denoisers.items()):
            state = acc.get_state_dict(model)
            path = Path(directory) / files[name]
            if acc.is_main_process:
                parts = (tes, [state, *te_states]) if n == 0 else ([], [state])
                path = lora_mod.save_lora(directory, type(self.pipe), unwrap(model), *parts, weight_name=files[name])
            paths.append(path)
        acc.wait_for_everyone()
        return paths[0]

    def save_checkpoint(self, directory: str | Path, extra: dict | None = None) -> None:
        """Optimizer, scaler and random generator state (safetensors and JSON, see ``runstate``; accelerate's
        pickles under FSDP/DeepSpeed), the LoRA (diffusers format) and the trainer state, atomically."""

        def save(tmp: Path) -> str:
            with _lora_only_state(self.accelerator):
                fmt = runstate.save_training_state(self.accelerator, tmp, self.optimizer)
            self.save_lora(tmp)
            return fmt

        state = {"step": self.global_step, "skipped_steps": self.skipped_steps, **(extra or {})}
        write_checkpoint(self.accelerator, directory, save, state)

    @staticmethod
    def _checkpoint_problem(directory: Path, lora: LoraSet, optimizer, acc, family: str) -> str | None:
        """What in a checkpoint does not fit the run being built -- its LoRA against the adapters, its optimizer,
        random and step state against this optimizer -- or None; nothing is loaded."""
        try:
            load_lora_files(directory, lora, family, f"checkpoint '{directory}'", check_only=True)
        except UserError as exc:
            return str(exc)
        return runstate.state_problem(acc, directory, read_state(directory).get("format"), optimizer)

    def _load_checkpoint(self, directory: Path) -> dict:
        """Optimizer/scaler/random state and step counters of a ``save_checkpoint`` directory (its LoRA is
        already in). Never unpickles, unless the checkpoint is accelerate's and ``--trust-pickle`` is given."""
        state = read_state(directory)
        fmt = state.get("format")
        if fmt != runstate.SAFE and not self.cfg.trust_pickle:
            raise UserError(
                f"--resume: checkpoint '{directory}' keeps its state in pickle files, which can run code "
                f"when loaded; pass --trust-pickle only if you wrote it yourself"
            )
        with _lora_only_state(self.accelerator):
            runstate.load_training_state(self.accelerator, directory, fmt, self.optimizer)
        self.global_step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        return state


def _check_before_loading(cfg: FinetuneConfig, family: str, acc) -> None:
    """What can be refused from the options and the model's config files alone, before any weights load."""
    check_family_options(cfg, family)
    check_fits(cfg, resolve_model(cfg.model), family, acc.device, acc.mixed_precision, force=cfg.force)


def _per_process(acc, value) -> list:
    """``value`` of every process, in process order (a one-element list on one process)."""
    if getattr(acc, "num_processes", 1) == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _load_reward(spec: str, cfg: FinetuneConfig, dtype: torch.dtype) -> torch.nn.Module:
    return load_reward(spec, dtype=None if dtype == torch.float32 else dtype, **cfg.reward_sources())


def _frozen(module: torch.nn.Module, device) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval().to(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this step (CUDA), or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _adapters_disabled(*models):
    lora_mod.set_adapters_enabled(False, *models)
    try:
        yield
    finally:
        lora_mod.set_adapters_enabled(True, *models)


@contextlib.contextmanager
def _lora_only_state(acc):
    """accelerate checkpoints without the frozen model weights: the LoRA is saved/loaded separately."""

    def drop_weights(models, weights, output_dir):
        weights.clear()

    def drop_models(models, input_dir):
        models.clear()

    handles = [acc.register_save_state_pre_hook(drop_weights), acc.register_load_state_pre_hook(drop_models)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
