"""Run by tests/test_distributed.py under ``accelerate launch --config_file recipes/accelerate/<recipe>.yaml`` with
two CPU processes (gloo). accelerate falls back to DDP on CPUs, so this script takes the recipe's FSDP settings as
accelerate's launcher hands them over (FullyShardedDataParallelPlugin() reads its environment) and applies
accelerate's own FSDP2 wrapping (``fsdp2_prepare_model``, the code the Accelerator runs on GPUs) to the denoiser
rewardtune's ``prepare_models`` sets up: a bf16 frozen base with fp32 LoRA weights. The denoiser is the pipeline's
UNet (SD 1.x) or transformer (Wan: video latents). It writes what it saw.

    python tests/fsdp_worker.py PIPELINE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from rewardtune.finetune.config import FinetuneConfig
from rewardtune.finetune.defaults import resolve_defaults
from rewardtune.finetune.models import load_pipeline, make_adapter
from rewardtune.finetune.trainer import prepare_models

BATCH = 4  # global; each process takes its half


def lora_denoiser(pipeline_dir: str):
    """The tiny pipeline's denoiser as ``prepare_models`` sets it up under bf16, its LoRA B matrices made
    non-zero."""
    cfg = FinetuneConfig(model=pipeline_dir, output="unused", lora_rank=4, lora_alpha=4.0, mixed_precision="bf16")
    pipe, family = load_pipeline(pipeline_dir, torch.bfloat16)
    resolve_defaults(cfg, pipe, family)  # the model's LoRA targets
    denoiser = prepare_models(cfg, pipe, make_adapter(pipe, family), torch.device("cpu")).denoiser
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return denoiser


def _is_video(denoiser) -> bool:
    return "text_dim" in denoiser.config  # WanTransformer3DModel's config; a UNet's has cross_attention_dim


def inputs(denoiser):
    """Latents, timesteps and text states for BATCH samples: (B, C, 8, 8) for a UNet; (B, 16, 2, 4, 4) (two
    latent frames) for Wan."""
    gen = torch.Generator().manual_seed(1)
    cfg = denoiser.config
    if _is_video(denoiser):
        x = torch.randn(BATCH, cfg.in_channels, 2, 4, 4, generator=gen)
        hidden = torch.randn(BATCH, 7, cfg.text_dim, generator=gen)
    else:
        x = torch.randn(BATCH, cfg.in_channels, 8, 8, generator=gen)
        hidden = torch.randn(BATCH, 7, cfg.cross_attention_dim, generator=gen)
    return x, torch.tensor([999, 700, 400, 100]), hidden


def loss(denoiser, rows=slice(None)):
    x, t, hidden = inputs(denoiser)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = denoiser(x[rows], t[rows], encoder_hidden_states=hidden[rows], return_dict=False)[0]
    return out.float().pow(2).mean()


def main(pipeline_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    denoiser = lora_denoiser(pipeline_dir)
    full_numel = {n: p.numel() for n, p in denoiser.named_parameters()}
    plugin = FullyShardedDataParallelPlugin()  # the recipe's settings, from accelerate launch's environment
    plugin.set_mixed_precision("bf16")  # what the Accelerator does under --mixed_precision bf16
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="bf16",
        is_main_process=rank == 0,
        torch_device_mesh=None,
        parallelism_config=None,
        device=torch.device("cpu"),
    )
    model = fsdp2_prepare_model(accelerator, denoiser)
    blocks = set(plugin.transformer_cls_names_to_wrap or ())  # the recipe's block classes
    params = dict(model.named_parameters())
    per_rows = BATCH // world
    loss(model, slice(rank * per_rows, (rank + 1) * per_rows)).backward()
    grads = {n: p.grad.full_tensor().float() for n, p in params.items() if p.requires_grad}
    report = {
        "world_size": world,
        "fsdp_version": plugin.fsdp_version,
        "parameters": len(params),
        "dtensors": sum(isinstance(p, DTensor) for p in params.values()),
        "sharded_dim0": sum(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values()),
        "local_numel": sum(p.to_local().numel() for p in params.values()),
        "full_numel": sum(full_numel.values()),
        "trainable_dtypes": sorted({str(p.dtype) for p in params.values() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in params.values() if not p.requires_grad}),
        "blocks": sorted(blocks),
        "units": sum(
            isinstance(m, FSDPModule) and any(c.__name__ in blocks for c in type(m).__mro__) for m in model.modules()
        ),
        "block_count": sum(any(c.__name__ in blocks for c in type(m).__mro__) for m in model.modules()),
    }
    out = Path(out_dir)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        save_file({n: g.contiguous() for n, g in grads.items()}, str(out / "grads.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
