"""The memory planner of ``rewardtune plan``.

The planner runs one real fine-tuning step (the Trainer's own sampling, gradient steps, decode and
reward code) on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes,
no storage) and counts every storage that is alive at once, rounded as the CUDA caching allocator
rounds them. See ``docs/performance.md`` for what it models and its known error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import precision_dtype
from ..errors import UserError
from ..finetune import families
from ..finetune import lora as lora_mod
from ..finetune.defaults import FAMILY_OPTIONS, resolve_defaults
from ..finetune.models import keeps_full_precision, make_adapter, prepare_pipeline
from ..finetune.sampler import make_sampler
from ..finetune.trainer import Trainer, TrainerParts, checkpoint_vae_decoder, prepare_models
from ..finetune.video import HostCount, for_video
from ..losses import reward_loss
from ..sizes import check_size, hw, parse_resolution
from . import cache as plan_cache
from . import stacks
from .architectures import (
    ARCH_OF_ALIAS,
    ARCHITECTURES,
    FULL_SIZE_REWARDS,
    REWARD_BACKBONE,
    _configs,
    arch_config,
    build_pipeline,
    build_reward,
)

# ----- counting memory on fake tensors ------------------------------------------------------------

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


def _round(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


class StorageTracker:
    """Peak bytes of live tensor storages while active: every op's outputs are counted until freed.

    Works on real and on fake tensors (a ``TorchDispatchMode``); storages that exist before
    (weights, optimizer states) are added with ``add_modules`` / ``add_tensors``.
    """

    def __init__(self, block: int = CUDA_BLOCK):
        tracker = self
        self.block = block

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.add_tensors(out)
                return out

        self._mode = _Mode()
        self._refs: dict[int, object] = {}
        self.current = 0
        self.peak = 0
        self.phase = "setup"
        self.phase_peaks: dict[str, int] = {}

    def add_tensors(self, obj) -> None:
        for t in tree_leaves(obj):
            if not isinstance(t, torch.Tensor):
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = st._cdata
            if key in self._refs:
                continue
            n = -(-st.nbytes() // self.block) * self.block
            self._refs[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
            self.current += n
            self.peak = max(self.peak, self.current)
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)

    def _free(self, key: int, n: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= n

    def add_modules(self, *modules) -> None:
        for m in modules:
            if m is not None:
                self.add_tensors(list(m.parameters()) + list(m.buffers()))

    def add_optimizer(self, optimizer) -> None:
        self.add_tensors([v for s in optimizer.state.values() for v in s.values()])

    def __enter__(self) -> StorageTracker:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# ----- the planner -----------------------------------------------------------------------------------

GIB = 2**30
PLAN_PROMPT = "a photograph of a red bicycle leaning against a stone wall"
PLAN_WORDS = PLAN_PROMPT.split()  # the planner's CLIP tokenizer knows these words only (shapes are what count)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What SDPA runs on an H100: flash attention for fp16/bf16 without a mask, memory-efficient otherwise
    (on fake CPU tensors PyTorch would pick the math kernel, which materialises the attention matrix).
    The argument names are SDPA's own: diffusers' attention dispatcher passes them by keyword."""
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, scale=scale
        )[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def _gpu_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def _cuda_autocast_policy():
    """Run group/layer norm and softmax in fp32 under autocast, as CUDA's autocast does: the trace runs on
    CPU tensors, whose autocast keeps them in bf16/fp16 and would halve those activations. (Patched at the
    functional level so that checkpoint recomputation in backward sees it too.)"""

    names = ("group_norm", "layer_norm", "softmax", "log_softmax")
    originals = {n: getattr(F, n) for n in names}

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def fp32(fn):
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return fn(*args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

        return run

    for n in names:
        setattr(F, n, fp32(originals[n]))
    try:
        yield
    finally:
        for n in names:
            setattr(F, n, originals[n])


class _Step(int):
    """A timestep as a Python int (fake tensors cannot be compared in ``if``), with the tensor methods the sampler calls."""

    def to(self, *args, **kwargs):
        return self

    def view(self, *shape):
        return torch.tensor([int(self)]).view(*shape)


class _FlowStep(float):
    """A flow step's timestep (sigma x 1000) as a Python float, with the tensor methods the flow sampler calls: its
    ``.to(device).expand(n)`` is a real tensor, whose value a conditioning can read inside the fake-tensor trace."""

    def to(self, *args, **kwargs):
        return self

    def expand(self, n: int) -> torch.Tensor:
        with unset_fake_temporarily():
            return torch.full((n,), float(self))


def _at_run_timesteps(sampler, run_cfg, pipe, adapter, weight_dtype, resolution) -> None:
    """Give the traced gradient steps the timesteps (and sigmas) the run gives them. The traced schedule has only
    the K steps that carry gradients (``_plan_config``), whose own values would be others (a 1-step schedule starts
    at t = 1000). Memory does not depend on the values, except where they pick the model that runs: Wan2.2-A14B
    calls its high-noise expert at t >= 875 (of 1000) and its low-noise one below, so the trace must call the experts
    the run's gradient steps call (its last K steps; ReFL: its latest stop), in that order: an expert with LoRA keeps
    activations and takes gradients, a frozen one keeps activations only where a trained call came before it."""
    if adapter.sampler_kind != "flow":
        return
    full = make_sampler(adapter.sampler_kind, pipe.scheduler, run_cfg, weight_dtype, adapter, resolution)
    n, total = len(sampler.timesteps), len(full.timesteps)
    start = total - n
    if run_cfg.method == "refl":  # one gradient step, at the latest stop (sampler.make_plan's upper bound)
        lo = min(total - 1, int(run_cfg.refl_min * total))
        start = min(total - 1, max(lo, math.ceil(run_cfg.refl_max * total) - 1))
    sampler.timesteps = [_FlowStep(float(t)) for t in full.timesteps[start : start + n]]
    sampler.sigmas = full.sigmas[start : start + n + 1].clone()


class _PlanAccelerator:
    """The single-process slice of ``accelerate.Accelerator`` a Trainer's micro-step uses, on fake CPU tensors."""

    num_processes, process_index = 1, 0

    def __init__(self, mixed_precision: str):
        self.mixed_precision = mixed_precision
        self.dtype = precision_dtype(mixed_precision)
        self.device = torch.device("cpu")

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)

    def unwrap_model(self, model):
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def _materialize(modules, memo: dict) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same shape and dtype (call in fake mode)."""
    seen = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            for name, p in list(m._parameters.items()):
                if p is not None:
                    if id(p) not in memo:
                        memo[id(p)] = torch.nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad
                        )
                    m._parameters[name] = memo[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype)
                    m._buffers[name] = memo[id(b)]


def _source(cfg, pipeline_dir) -> str:
    """The shipped architecture (``flux-dev`` is ``fluxdev``) or the local directory the plan builds."""
    source = str(pipeline_dir or cfg.model)
    source = ARCH_OF_ALIAS.get(source, source)
    return source if source in ARCHITECTURES else str(Path(source).expanduser())


def _meta_pipeline(cfg, source: str, overrides: dict | None = None):
    """(pipeline on meta, family) of ``source`` with the config ``overrides`` (fewer layers)."""
    weight_dtype = precision_dtype(cfg.mixed_precision)
    pipe = build_pipeline(source, weight_dtype, "meta", overrides=overrides, tokenizer_words=PLAN_WORDS)
    return prepare_pipeline(pipe)  # the Trainer's scheduler and settings


def _local_clip_config(cfg) -> dict | None:
    """The CLIP config of a local reward backbone the user named (--backbone, --ict, --hp), if any."""
    candidates = [cfg.backbone, cfg.ict, str(Path(cfg.hp) / "hp_backbone") if cfg.hp else ""]
    for src in candidates:
        path = Path(src).expanduser() / "config.json" if src else None
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            if "vision_config" in data and "text_config" in data:
                return data
    return None


def _reward_name(cfg) -> str:
    """The traced reward: ICT/HP/ICT-HP (and PickScore, the same ViT-H-14 scoring cosines, as ICT), or one of
    ``FULL_SIZE_REWARDS`` (its module builds its released architecture)."""
    if cfg.reward not in ("ict", "hp", "icthp", "pickscore", *FULL_SIZE_REWARDS):
        raise UserError(
            f"the planner models the ViT-H-14 rewards (ict, hp, icthp, pickscore) and "
            f"{', '.join(FULL_SIZE_REWARDS)}; got --reward '{cfg.reward}'"
        )
    return "ict" if cfg.reward == "pickscore" else cfg.reward


def _meta_reward(cfg, arch: dict | None):
    """The reward on meta: ViT-H-14 towers built from ``arch`` (a CLIPConfig dict), or a reward of
    ``FULL_SIZE_REWARDS`` with ``arch`` the depths of its stacks ({stack name: layers}; None: as released)."""
    dtype = precision_dtype(cfg.mixed_precision)
    name = _reward_name(cfg)
    if name in FULL_SIZE_REWARDS:  # without mixed precision its own dtype, as the Trainer loads it (_load_reward)
        return build_reward(name, None if dtype == torch.float32 else dtype, "meta", depths=arch)
    return build_reward(name, dtype, "meta", clip_config=arch, tokenizer_words=PLAN_WORDS)


def _module_bytes(module, block: int) -> int:
    """Bytes of ``module``'s parameters and buffers as the tracker counts them (one storage each, rounded)."""
    seen = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(-(-t.numel() * t.element_size() // block) * block for t in seen.values())


def _plan_config(cfg):
    """The config traced: the same memory as ``cfg``, without the no-gradient steps (see below) and with the worst
    case of the random methods."""

    over = {"output": cfg.output or "/nonexistent-plan-output", "grad_accum": 1, "eval_every": 0}
    k = cfg.k if cfg.method in ("draft-k", "alignprop") else 1
    if k is None:  # alignprop's default K, all sampling steps: known once the model's defaults are resolved
        return dataclasses.replace(cfg, **over)
    if cfg.method in ("alignprop", "refl"):
        over.update(method="draft-k", k=k)  # alignprop's largest draw; refl has one gradient step
    # no step without gradients: its call holds nothing afterwards and, while it runs, no more than the first
    # gradient call holds (the same call, the same inputs), so the peak is decided by the K gradient steps
    over["sample_steps"] = min(cfg.sample_steps or k, k)  # unset: the model's default, at least k
    return dataclasses.replace(cfg, **over)


# ----- a frozen base quantized by bitsandbytes ----------------------------------------------------------
#
# ``--quantize-base`` loads the denoiser through diffusers' ``BitsAndBytesConfig`` (``finetune.models``), which
# replaces every ``nn.Linear`` (none is kept in higher precision for the SD3/FLUX transformers or the UNet) by a
# bitsandbytes layer; everything else (norms, convolutions, embeddings) stays in the compute dtype and the LoRA
# weights in fp32. Per frozen Linear weight of shape (out, in):
#   nf4:  4-bit codes packed two a byte, (out*in + 1) // 2 bytes, plus one fp32 absmax per block of 64 values
#         (bitsandbytes' quantize_4bit blocksize 64; diffusers' BitsAndBytesConfig leaves
#         bnb_4bit_use_double_quant False, so the absmax stays fp32): 0.5 + 4/64 = 0.5625 bytes a weight.
#   int8: LLM.int8() codes, 1 byte a weight, plus one fp32 scale per output row (SCB).
# In a step each quantized layer dequantizes its weight to the compute dtype for the matmul, forward and again
# in backward (bitsandbytes' MatMul4Bit saves only the quantized weight, and no input since the weight takes no
# gradient): a transient of one weight in bf16/fp16, freed after the matmul. LLM.int8()'s int8 copy of the input
# and its int32 product are not modelled.
NF4_BLOCK = 64


def _quantized_state(weight: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The storages bitsandbytes keeps for one frozen Linear weight in ``mode`` (see above)."""
    n = weight.numel()
    if mode == "nf4":
        return [
            torch.empty(((n + 1) // 2,), dtype=torch.uint8),
            torch.empty((-(-n // NF4_BLOCK),), dtype=torch.float32),
        ]
    return [torch.empty(weight.shape, dtype=torch.int8), torch.empty((weight.shape[0],), dtype=torch.float32)]


class _DequantMatmul(torch.autograd.Function):
    """``x @ W.T + b`` as a bitsandbytes layer computes it: W dequantized to the compute dtype for the product
    (forward and backward) and not kept; only the quantized state is saved."""

    @staticmethod
    def forward(ctx, x, packed, shape, dtype, bias):
        ctx.shape, ctx.dtype, ctx.in_dtype = shape, dtype, x.dtype
        ctx.save_for_backward(packed)
        w = torch.empty(shape, dtype=dtype)
        return torch.nn.functional.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(ctx.shape, dtype=ctx.dtype)
        return (grad.to(ctx.dtype) @ w).to(ctx.in_dtype), None, None, None, None


def _quantize_linears(model: torch.nn.Module, mode: str, dtype: torch.dtype) -> tuple[set, list]:
    """Make every frozen ``nn.Linear`` of ``model`` that the loader quantizes (all but those in the modules the model
    keeps in float32) compute as a bitsandbytes layer of ``mode`` ('nf4'/'int8').
    Returns (ids of the weights no longer resident, the quantized storages that replace them)."""
    gone, state = set(), []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or keeps_full_precision(model, name):
            continue  # LoRA's own A/B layers are trained, and stay fp32
        weight, bias = module.weight, module.bias
        stored = _quantized_state(weight, mode)
        gone.add(id(weight))
        state += stored
        module.forward = lambda x, packed=stored[0], shape=tuple(weight.shape), bias=bias: _DequantMatmul.apply(
            x, packed, shape, dtype, bias
        )
    return gone, state


def _optimizer_states(params, name: str) -> list[torch.Tensor]:
    """AdamW's two fp32 moments per weight, or bitsandbytes' 8-bit moments with one fp32 scale per 256 values."""
    out = []
    for p in params:
        if name == "adamw8bit" and p.numel() >= 4096:
            out += [torch.empty(p.shape, dtype=torch.uint8) for _ in range(2)]
            out += [torch.empty((-(-p.numel() // 256),), dtype=torch.float32) for _ in range(2)]
        else:
            out += [torch.empty(p.shape, dtype=torch.float32) for _ in range(2)]
    return out


def predict_peak_memory(
    cfg,
    pipeline_dir=None,
    reward_config: dict | None = None,
    vae_block_checkpointing: bool = False,
    target: str = "cuda",
    full_depth: bool = False,
    cache: bool = False,
) -> dict:
    """Predict the peak GPU memory of one fine-tuning step of ``cfg`` (a ``FinetuneConfig``) before it runs.

    Traces the Trainer's own step parts on fake tensors, with one layer per repeated stack of layers (the
    transformer's blocks, the reward towers' layers, the text encoders), and extends each phase's peak to the full
    depth along slopes traced with one more layer (``stacks``); ``full_depth`` traces every layer instead (slower,
    the reference the reduced trace is checked against). ``pipeline_dir`` overrides ``cfg.model``;
    ``reward_config`` (a CLIPConfig dict) replaces the ViT-H-14 towers; ``vae_block_checkpointing`` also
    checkpoints the VAE decoder layer by layer (``checkpoint_vae_decoder``; a benchmark experiment).
    ``target='cpu'`` predicts a CPU run instead (CPU autocast and attention kernels, no allocator rounding).
    ``cache``: reuse (and store) the answer for the same inputs, code and library versions (``cache``).
    Returns MiB/GiB figures.

    Flow families (SD3, FLUX) run the adapter's prompt caching first: T5 and untrained CLIP encoders are not
    resident. ``cfg.quantize_base`` 'nf4'/'int8' models bitsandbytes' frozen Linear weights (0.5625 / 1 byte a
    weight plus scales, dequantized per matmul; see the comment above ``_quantized_state``).
    """

    if target not in ("cuda", "cpu"):
        raise UserError(f"plan target must be cuda or cpu, got '{target}'")
    cfg.validate() if cfg.output else _plan_config(cfg).validate()
    _reward_name(cfg)
    key = None
    if cache:
        key = plan_cache.key(cfg, pipeline_dir, reward_config, vae_block_checkpointing, target, full_depth)
        hit = plan_cache.load(key)
        if hit is not None:
            return hit
    out = _predict(cfg, pipeline_dir, reward_config, vae_block_checkpointing, target, full_depth)
    if cache:
        plan_cache.store(key, out)
    return out


def _predict(cfg, pipeline_dir, reward_config, vae_block_checkpointing, target, full_depth) -> dict:
    """``predict_peak_memory`` without the cache: the base trace, one per traced stack, and the extension."""
    source = _source(_plan_config(cfg), pipeline_dir)
    family, configs, _ = _configs(source)
    den_part = "transformer" if "transformer" in configs else "unet"
    # a pair of experts (Wan2.2-A14B's transformer_2) has the first one's architecture: its stacks are reduced and
    # extended with the first one's, under the same names (one more layer of a stack is one more in each expert)
    den_parts = [den_part, *(p for p in families.by_name(family).lora_parts if p in configs)]
    den_stacks = [] if full_depth else stacks.denoiser_stacks(family, configs[den_part])
    text_over = {}
    if not full_depth and families.by_name(family).flow:
        text_over = stacks.text_encoder_overrides(configs, cfg.train_text_encoder)
    own = FULL_SIZE_REWARDS.get(_reward_name(cfg))  # a reward whose module builds it, and names its stacks
    if own is None:
        clip_full = reward_config or _local_clip_config(cfg) or arch_config(REWARD_BACKBONE)
        r_stacks = [] if full_depth else stacks.reward_stacks(clip_full)
        probed = [s for s in r_stacks if s.name == "reward.vision"]  # the text tower takes no gradient
    else:
        r_stacks = [] if full_depth else stacks.module_reward_stacks(own)
        probed = r_stacks  # the gradient to the pixels runs through every stack
    base_depths = {s.name: stacks.BASE_DEPTH for s in (*den_stacks, *r_stacks)}

    def overrides(depths):
        if not den_stacks:
            return text_over
        return {**text_over, **{p: stacks.denoiser_overrides(family, configs[p], depths) for p in den_parts}}

    def clip(depths):  # the reward's architecture with its stacks at ``depths``, as ``_meta_reward`` takes it
        if own is not None:
            return {s.name: depths[s.name] for s in r_stacks} or None
        return stacks.reward_config(clip_full, depths)

    block = CUDA_BLOCK if target == "cuda" else 1
    # the reward's phases traced with the reward alone: at the base depths, then one more layer of each probed stack
    one_more_of = [clip({**base_depths, s.name: stacks.BASE_DEPTH + 1}) for s in probed]
    # a module's stacks also with two more layers: a lone layer of a language model is no later layer's like
    # (HPSv3's first added text layer adds 148.3 MiB to the reward's forward, each later one 141.9)
    two_more_of = [clip({**base_depths, s.name: stacks.BASE_DEPTH + 2}) for s in probed] if own is not None else []
    probes = [clip(base_depths), *one_more_of, *two_more_of] if probed else []
    base = _trace(cfg, source, overrides(base_depths), clip(base_depths), target, vae_block_checkpointing, probes)
    peaks = dict(base["peaks"])
    totals = {k: base[k] for k in ("weights", "resident", "trainable")}

    def extend(stack, slopes: dict, deltas: dict):
        for phase in peaks:
            peaks[phase] += slopes[phase] * (stack.full - stacks.BASE_DEPTH)
        for k in totals:
            totals[k] += deltas[k] * (stack.full - stacks.BASE_DEPTH)

    for stack in den_stacks:  # one more layer of this stack, traced without the decode and reward's own work
        more = _trace(
            cfg,
            source,
            overrides({**base_depths, stack.name: stacks.BASE_DEPTH + 1}),
            clip(base_depths),
            target,
            vae_block_checkpointing,
            stand_in=True,
        )
        missing = [p for p in peaks if p not in PASSIVE_PHASES and p not in more["peaks"]]
        if missing:
            raise RuntimeError(f"planner: the trace with one more {stack.name} layer has no phase {missing[0]}")
        # while the VAE and the reward run, the denoiser's layers hold what they held when the decode began
        held = more["starts"]["decode"] - base["starts"]["decode"]
        slopes = {p: held if p in PASSIVE_PHASES else more["peaks"][p] - base["peaks"][p] for p in peaks}
        extend(stack, slopes, {k: more[k] - base[k] for k in totals})
    for stack in r_stacks:  # the towers' layers: their weights, and the probed layers' activations while scoring
        one_more = {**base_depths, stack.name: stacks.BASE_DEPTH + 1}
        weights = _module_bytes(_meta_reward(cfg, clip(one_more)), block) - _module_bytes(
            _meta_reward(cfg, clip(base_depths)), block
        )
        # --reward-offload: the towers are on the accelerator in the reward's phases only
        here = weights if not cfg.reward_offload else 0
        slopes = {p: weights if p in REWARD_PHASES else here for p in peaks}
        if stack in probed:
            i = 1 + probed.index(stack)
            for phase in REWARD_PHASES:
                slopes[phase] = base["probes"][i][phase] - base["probes"][0][phase]
                if two_more_of:  # the first added layer's step, then the later layers' (as one mean slope)
                    later = base["probes"][i + len(probed)][phase] - base["probes"][i][phase]
                    added = stack.full - stacks.BASE_DEPTH
                    slopes[phase] = (slopes[phase] + (added - 1) * later) / added
        extend(stack, slopes, {"weights": here, "resident": here, "trainable": 0})

    peak = max(peaks.values())
    parts: dict = {}
    for name, value in peaks.items():  # the denoiser's passes, named block by block, each as one part
        part = name.split("|")[0]
        parts[part] = max(parts.get(part, 0), value)
    out = {"part_peaks_mib": {k: v / 2**20 for k, v in parts.items()}}
    out.update(
        _summary(source, family, base["resolution"], totals["weights"], totals["resident"], peak, totals["trainable"])
    )
    out["quantize_base"] = base["quantize_base"]
    out["traced_layers"] = {s.name: [stacks.BASE_DEPTH, s.full] for s in (*den_stacks, *r_stacks)}
    out["traces"] = 1 + len(den_stacks)
    if base["host"]:  # a video decode's checkpoints wait in host memory (finetune/video.py, HostOffload)
        out["host_mib"] = base["host"] / 2**20
    return out


REWARD_PHASES = ("reward", "backward:reward")
# The phases in which the denoiser only holds what its gradient steps kept: between the end of its forward pass and
# the start of its backward pass.
PASSIVE_PHASES = ("decode", "reward", "pretrain", "backward:reward", "backward:decode")


def _trace(cfg, source, overrides, clip_config, target, vae_block_checkpointing, probes=(), stand_in=False) -> dict:
    """One traced step of ``cfg`` on ``source`` built with ``overrides`` and the reward of ``clip_config``: the peak
    of each phase and the memory as it starts, the weights, resident bytes, trainable parameters; for each of
    ``probes`` (reward configs) the peaks of the reward's phases with that reward alone scoring the step's images.
    ``stand_in``: the latents are scored by their mean instead of being decoded and rewarded (the denoiser's phases
    are the same, the ones in between are not: for a denoiser layer's slope)."""
    pcfg = _plan_config(cfg)
    weight_dtype = precision_dtype(pcfg.mixed_precision)
    pipe, family = _meta_pipeline(pcfg, source, overrides)
    fewest = families.by_name(family).min_sample_steps  # no-gradient steps added hold nothing (see _plan_config)

    def at_least_fewest(c):
        return c if c.sample_steps is None or c.sample_steps >= fewest else dataclasses.replace(c, sample_steps=fewest)

    run_cfg = dataclasses.replace(cfg, output=pcfg.output)  # the run's own settings: its whole schedule
    resolve_defaults(run_cfg, pipe, family)
    # the adapter of the run: a family may settle its options from the run's settings (Wan's --lora-on: the experts
    # the run's gradient steps reach, which a schedule of only those steps cannot tell)
    adapter = make_adapter(pipe, family, run_cfg)
    settled = {name: getattr(run_cfg, name) for name in FAMILY_OPTIONS if hasattr(run_cfg, name)}
    pcfg = at_least_fewest(dataclasses.replace(pcfg, **settled))
    resolve_defaults(pcfg, pipe, family)  # options left unset take the model's defaults, as in the Trainer
    pcfg = at_least_fewest(_plan_config(pcfg))  # again, for a K the model's sampling steps decide (alignprop's)
    reward = _meta_reward(pcfg, clip_config)
    resolution = pcfg.resolution or adapter.native_resolution()
    check_size(adapter, resolution)
    # xformers: the same memory as flash/efficient SDPA, which the trace substitutes
    setup_cfg = dataclasses.replace(pcfg, attention="sdpa") if pcfg.attention == "xformers" else pcfg
    lora = prepare_models(setup_cfg, pipe, adapter, "meta")
    if vae_block_checkpointing:
        checkpoint_vae_decoder(pipe.vae)
    sampler = make_sampler(adapter.sampler_kind, pipe.scheduler, pcfg, weight_dtype, adapter, resolution)
    if adapter.sampler_kind == "ddim":  # DDIM indexes its tables with the timestep; flow steps use sigmas
        sampler.timesteps = [_Step(int(x)) for x in sampler.timesteps.tolist()]
    _at_run_timesteps(sampler, run_cfg, pipe, adapter, weight_dtype, resolution)
    parts = TrainerParts(
        pipe,
        adapter,
        sampler,
        for_video(reward, adapter, pcfg),  # a video family scores frames (finetune/video.py)
        lora,
        _PlanAccelerator(pcfg.mixed_precision),
        prompts=[PLAN_PROMPT],
        resolution=resolution,
    )
    flow = families.by_name(family).flow
    # Flow families cache the prompt set's embeddings on the CPU; then T5, and the CLIP encoders unless they are
    # trained, leave the accelerator. SD/SDXL keep their text encoders beside the UNet.
    encoders = lora.text_encoders if flow else adapter.text_encoders()
    # every denoiser on the accelerator: the trained ones and a frozen expert of a pair (Wan2.2-A14B's)
    denoisers = [*lora.denoisers.values(), *getattr(adapter, "frozen_parts", list)()]
    modules = [m for m in (*denoisers, pipe.vae, *encoders, reward) if m is not None]
    every = modules + [m for m in (*adapter.text_encoders(), getattr(adapter, "t5", None)) if m is not None]
    gpu = target == "cuda"
    block = CUDA_BLOCK if gpu else 1
    probe_rewards = [
        for_video(_meta_reward(pcfg, clip), adapter, pcfg) for clip in probes
    ]  # built on meta before fake mode, as the rest
    with (
        warnings.catch_warnings(),
        FakeTensorMode(allow_non_fake_inputs=True),
        _gpu_attention() if gpu else contextlib.nullcontext(),
        _cuda_autocast_policy() if gpu else contextlib.nullcontext(),
    ):
        # rms_norm of an fp32 input (after the emulated CUDA autocast) with bf16 weights has no fused CPU kernel:
        # torch says so once per trace, about the fake CPU tensors, not the GPU the plan is for
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)
        memo: dict = {}
        _materialize(every, memo)
        with parts.accelerator.autocast():
            adapter.cache_prompts([PLAN_PROMPT])  # the Trainer's own caching; the cache stays on the CPU
        gone, quantized = set(), []
        if pcfg.quantize_base != "none":  # every denoiser, as the loader does (an A14B pair's two experts)
            for denoiser in denoisers:
                ids, stored = _quantize_linears(denoiser, pcfg.quantize_base, weight_dtype)
                gone, quantized = gone | ids, quantized + stored
        trainer = Trainer.from_parts(pcfg, parts)
        trainer.decode_host = HostCount() if gpu else None  # as the Trainer on an accelerator (host not counted)
        trainable = lora_mod.trainable_parameters(*lora.modules)
        tracker = StorageTracker(block)
        away = [reward] if pcfg.reward_offload else []  # --reward-offload: in CPU memory until it scores
        kept = [t for m in modules if m not in away for t in (*m.parameters(), *m.buffers()) if id(t) not in gone]
        tracker.add_tensors(kept + quantized)
        if away:
            trainer._place_rewards = _counted_placement(tracker, reward)
        weights = tracker.current
        states = _optimizer_states(trainable, pcfg.optimizer)  # alive (and counted) through the step
        tracker.add_tensors(states)
        resident = tracker.current
        experts = [(m, stacks.denoiser_blocks(family, m)) for m in denoisers]
        with tracker:
            scored, starts = _trace_step(trainer, trainable, pcfg, tracker, stand_in, experts)
        del states
        probe_peaks = [_probe_reward(trainer, pcfg, r, scored, memo, block) for r in probe_rewards]
    return {
        "peaks": _one_block_is_first_and_later(tracker.phase_peaks, experts[0][1]),
        "starts": starts,
        "weights": weights,
        "resident": resident,
        "trainable": sum(p.numel() for p in trainable),
        "resolution": resolution,
        "family": family,
        "quantize_base": pcfg.quantize_base,
        "probes": probe_peaks,
        "host": trainer.decode_host.bytes if trainer.decode_host is not None else 0,
    }


def _counted_placement(tracker: StorageTracker, reward):
    """``Trainer._place_rewards`` for the trace: the reward's weights join the accelerator's live storage when they
    are moved there and leave it when moved back (the trace runs on one fake device, where ``.to`` moves nothing)."""
    tensors = [*reward.parameters(), *reward.buffers()]

    def place(on: bool, *models) -> None:
        if models and reward not in models:
            return
        if not on:
            for t in tensors:
                st = t.untyped_storage()
                tracker._free(st._cdata, -(-st.nbytes() // tracker.block) * tracker.block)
        else:
            tracker.add_tensors(tensors)

    return place


def _one_block_is_first_and_later(peaks: dict, blocks) -> dict:
    """A stack traced with one block has a first block and no later one; that block stands for both, so the names of
    a one-block and a two-block trace match (``_DenoiserLabels``)."""
    depth: dict = {}
    for _, stack in blocks:
        depth[stack] = depth.get(stack, 0) + 1
    out = dict(peaks)
    for name, value in peaks.items():
        parts = name.split("|")
        if len(parts) == 5 and parts[4] == "first" and depth.get(parts[3]) == 1:
            later = "|".join([*parts[:4], "later"])
            out[later] = max(out.get(later, 0), value)
    return out


class _DenoiserLabels:
    """Names each moment of the denoiser's gradient steps (``grad_steps``) and of its backward pass
    (``backward:denoiser``) by what is being worked on: the gradient call (counted in that pass's order); a block's
    forward, its own backward (with its recomputation), or a block of a whole call's recomputed forward pass; the
    block's stack and whether it is that stack's first block in that pass or a later one; and the gaps where a pass
    leaves a stack. A stack's blocks hold the same at the same moment, so each name's peak is affine in the stacks'
    depths, which a whole phase's peak (the largest of them: where held inputs give way to gradients, or one stack's
    blocks to another's) is not. Installed as module hooks for one traced step (``close`` removes them).

    ``experts``: (denoiser, its blocks) for each denoiser the step may call (a pair of experts: both, whose calls are
    counted as one denoiser's, each call running one of them)."""

    FORWARD, BACKWARD = "grad_steps", "backward:denoiser"

    def __init__(self, tracker, experts):
        self.tracker, self.counts, self.own, self.recomputing = tracker, {}, None, None
        self.calls = {self.FORWARD: 0, self.BACKWARD: 0}
        self.block_outputs: set[int] = set()  # a block's output is the next block's input: its start comes first
        self.handles = []
        for denoiser, blocks in experts:
            first, last = {}, {}  # each stack's first and last block in forward order
            for module, stack in blocks:
                first.setdefault(stack, module)
                last[stack] = module
            self.handles.append(denoiser.register_forward_pre_hook(self._call_start))
            for module, stack in blocks:
                self.handles.append(module.register_forward_pre_hook(self._forward(module, stack)))
                hook = self._outputs(module, stack, last[stack] is module, first[stack] is module)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _pass(self) -> str | None:
        phase = self.tracker.phase
        return next((p for p in (self.FORWARD, self.BACKWARD) if phase.startswith(p)), None)

    def _label(self, what: tuple, kind: str | None = None, stack: str | None = None) -> None:
        pass_ = self._pass()
        call = self.calls[pass_]
        if kind is not None:
            n = self.counts.get((pass_, call, kind, stack), 0)
            self.counts[(pass_, call, kind, stack)] = n + 1
            what = (*what, "first" if n == 0 else "later")
        self.tracker.phase = "|".join([pass_, str(call), *what])

    def _call_start(self, module, args):
        pass_ = self._pass()
        if pass_ is not None:  # a gradient call, or (backward) a checkpointed one recomputed
            self.calls[pass_] += 1
            self.own = None
            self._label(("start",))

    def _forward(self, module, stack):
        def hook(mod, args):
            pass_ = self._pass()
            if pass_ is None:
                return
            if pass_ == self.BACKWARD and self.own is module:  # the block's own recomputation, in its backward
                self.own, self.recomputing = None, module
                return
            self._label(("forward", stack), "forward", stack)

        return hook

    def _outputs(self, module, stack, last: bool, first: bool):
        def once(fn):
            done = []

            def hook(grad):
                if not done:
                    done.append(True)
                    fn()

            return hook

        def backward_starts():
            self._label(("backward", stack), "backward", stack)
            self.own = module

        def hook(mod, args, kwargs, output):
            pass_ = self._pass()
            if pass_ == self.BACKWARD:  # a recomputation: its outputs take no gradient
                if self.recomputing is module:
                    self.recomputing = None
                elif last:  # a recomputed pass leaves this stack
                    self._label(("forward-after", stack))
                return
            if pass_ == self.FORWARD and last:
                self._label(("forward-after", stack))
            started = once(backward_starts)
            for t in output if isinstance(output, tuple) else (output,):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(started)
                    self.block_outputs.add(id(t))
            if first:  # when the gradient reaches this block's inputs, the backward pass leaves this stack
                left = once(lambda: self._label(("backward-after", stack)))
                for t in (*args, *kwargs.values()):
                    if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.block_outputs:
                        t.register_hook(left)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _trace_step(trainer, trainable, cfg, tracker, stand_in: bool = False, experts=()) -> tuple[dict, dict]:
    """One micro-batch (batch_size prompts) through the Trainer's own ``micro_step``, then the optimizer's
    transients. The backward pass is split where the gradient reaches the decoded images (``backward:decode``) and
    the latents (``backward:denoiser``, named further, as ``grad_steps``, by ``_DenoiserLabels`` over ``experts``).
    ``stand_in``: the latents' mean is the reward (no decode, no towers). Returns what the reward scored (images'
    shape and the prompts) and the memory as each phase started."""
    starts: dict = {}

    def enter(phase):
        starts.setdefault(phase, tracker.current)
        tracker.phase = phase

    def mark(name):
        enter({None: "optimizer", "backward": "backward:reward"}.get(name, name))

    scored = {}
    decode, score = trainer.decode, trainer.score

    def decode_marked(latents):
        if latents.requires_grad:
            latents.register_hook(lambda grad: enter("backward:denoiser"))
        return latents.float() * 1.0 if stand_in else decode(latents)  # a tensor of its own: its own hook

    def score_marked(images, prompts):
        scored.update(shape=tuple(images.shape), prompts=list(prompts))
        if images.requires_grad and not cfg.reward_offload:  # (offloaded: the Trainer marks backward:decode)
            images.register_hook(lambda grad: enter("backward:decode"))
        return images.flatten(1).mean(1) if stand_in else score(images, prompts)

    trainer.decode, trainer.score = decode_marked, score_marked
    labels = _DenoiserLabels(tracker, experts or [(trainer.unet, [])])
    split = cfg.reward_split_every
    if stand_in:
        cfg.reward_split_every = 0  # the ICT-HP split needs images (and only adds to the reward's phase)
    try:
        # the regulariser stays alive through the optimizer step, as in Trainer.step
        _, reg, _ = trainer.micro_step([PLAN_PROMPT] * cfg.batch_size, torch.Generator().manual_seed(0), on_part=mark)
    finally:
        trainer.decode, trainer.score = decode, score
        cfg.reward_split_every = split
        labels.close()
    # AdamW's foreach update holds about two weight-sized fp32 temporaries while the gradients still live.
    temps = [torch.empty(p.shape, dtype=torch.float32) for p in trainable for _ in range(2)]
    del temps, reg
    return scored, starts


def _probe_reward(trainer, cfg, reward, scored, memo, block) -> dict:
    """The peaks of the reward's forward and backward (``REWARD_PHASES``) with ``reward`` (on meta) alone scoring
    images of the step's shape, as ``micro_step`` scores them: the vision layers' slope in those phases."""
    _materialize([reward], memo)
    own = trainer.reward
    trainer.reward = reward
    try:
        tracker = StorageTracker(block)
        images = torch.empty(scored["shape"], dtype=torch.float32, requires_grad=True)
        tracker.add_tensors([*reward.parameters(), *reward.buffers(), images])
        with tracker:
            tracker.phase = "reward"
            r = trainer.score(images, scored["prompts"])
            loss = cfg.loss_scale * reward_loss(r, cfg.loss, cfg.hinge_margin)
            if trainer._split_step(1):  # as micro_step on the planner's first step
                with trainer.accelerator.autocast():
                    trainer.reward.gradient_split(images.detach(), scored["prompts"])
            tracker.phase = "backward:reward"
            loss.backward()
            del loss, r
    finally:
        trainer.reward = own
    return {phase: tracker.phase_peaks.get(phase, 0) for phase in REWARD_PHASES}


def _summary(arch, family, resolution, weights, resident, peak, n_train) -> dict:
    return {
        "peak_mib": peak / 2**20,
        "peak_gib": peak / GIB,
        "weights_mib": weights / 2**20,
        "resident_mib": resident / 2**20,
        "activations_mib": (peak - resident) / 2**20,
        "trainable_params": int(n_train),
        "architecture": str(arch),
        "family": family,
        "resolution": resolution,
        "method": "fake-tensor trace of the Trainer's step parts (allocator-rounded live storage)",
    }


# ----- which knobs make a config fit a budget -------------------------------------------------------


def _variants(cfg, native: int) -> list[tuple[str, dict]]:
    """Single-knob changes that lower memory, cheapest in quality/speed first."""
    out = []
    k = cfg.k or 0  # unknown until the model's sampling steps are (alignprop's default): no --k variants
    if not cfg.checkpoint_calls and k > 1:
        out.append(("--checkpoint-calls", {"checkpoint_calls": True}))
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if cfg.optimizer == "adamw":
        out.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if cfg.vae_fp32 and cfg.mixed_precision != "no":
        out.append(("--no-vae-fp32", {"vae_fp32": False}))
    if cfg.mixed_precision == "no":
        out.append(("--mixed-precision bf16", {"mixed_precision": "bf16"}))
    # a quantized frozen base (QLoRA-style): int8 first (closer to the bf16 weights), then nf4
    if cfg.quantize_base == "none":
        out.append(("--quantize-base int8", {"quantize_base": "int8"}))
    if cfg.quantize_base in ("none", "int8"):
        out.append(("--quantize-base nf4", {"quantize_base": "nf4"}))
    if k > 1 and cfg.method in ("draft-k", "alignprop"):
        out.append((f"--k {max(1, k // 2)}", {"k": max(1, k // 2)}))
        if k // 2 > 1:
            out.append(("--k 1", {"k": 1}))
    if cfg.batch_size > 1:
        out.append(
            (
                f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2}",
                {"batch_size": max(1, cfg.batch_size // 2), "grad_accum": cfg.grad_accum * 2},
            )
        )
    sides = hw(cfg.resolution or native)

    def three_quarters(res: int) -> int:
        step = 64 if res >= 256 else 8  # 1024 -> 768, 512 -> 384; small test models by multiples of 8
        return max(32, (res * 3 // 4) // step * step)

    smaller = parse_resolution(tuple(map(three_quarters, sides)))
    if hw(smaller) != sides and all(a <= b for a, b in zip(hw(smaller), sides)):
        out.append((f"--resolution {smaller}", {"resolution": smaller}))
    return out


def fit_budget(cfg, budget_gib: float, **kw) -> dict:
    """Predict ``cfg`` and, if it exceeds ``budget_gib``, the knob changes (alone, else combined) that fit."""

    if not math.isfinite(budget_gib) or budget_gib <= 0:
        raise UserError(f"--budget-gib must be a positive finite number of GiB, got {budget_gib}")
    base = predict_peak_memory(cfg, **kw)
    result = {"prediction": base, "budget_gib": budget_gib, "fits": base["peak_gib"] <= budget_gib, "suggestions": []}
    if result["fits"]:
        return result
    if base["resident_mib"] / 1024 > budget_gib:
        # Only a quantized base and 8-bit optimizer states lower the weights and states themselves: their least.
        least = dataclasses.replace(cfg, quantize_base="nf4", optimizer="adamw8bit")
        lowest = base if least == cfg else predict_peak_memory(least, **kw)
        if lowest["resident_mib"] / 1024 > budget_gib:
            _below_weights(budget_gib, lowest)
    native = base["resolution"] if not cfg.resolution else cfg.resolution
    singles = []
    for flag, change in _variants(cfg, native):
        pred = predict_peak_memory(dataclasses.replace(cfg, **change), **kw)
        if pred["peak_gib"] < base["peak_gib"]:  # e.g. a quantized base can cost more than it saves on a small model
            singles.append({"change": flag, "peak_gib": pred["peak_gib"], "fits": pred["peak_gib"] <= budget_gib})
    result["suggestions"] = singles
    if not any(s["fits"] for s in singles):
        current, flags, last = cfg, [], None
        for _ in range(10):  # greedy: keep applying the first remaining knob until it fits
            options = _variants(current, native)
            if not options:
                break
            flag, change = options[0]
            current = dataclasses.replace(current, **change)
            flags.append(flag)
            last = predict_peak_memory(current, **kw)
            if last["peak_gib"] <= budget_gib:
                break
        fits = last is not None and last["peak_gib"] <= budget_gib
        result["combined"] = {"changes": flags, "peak_gib": last["peak_gib"] if last else None, "fits": fits}
    return result


def _below_weights(budget_gib: float, pred: dict) -> None:
    raise UserError(
        f"a budget of {budget_gib:g} GiB is less than the weights and optimizer states alone "
        f"({pred['resident_mib'] / 1024:.2f} GiB: model, reward towers, LoRA, at best); no setting of this config "
        f"fits. Use a smaller model or reward, or a larger GPU"
    )
