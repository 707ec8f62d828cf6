"""Run by tests/test_distributed.py under ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` with two
CPU processes (gloo). accelerate falls back to DDP on CPUs, so this script takes the recipe's FSDP settings as
accelerate's launcher hands them over (FullyShardedDataParallelPlugin() reads its environment) and applies
accelerate's own FSDP2 wrapping (``fsdp2_prepare_model``, the code the Accelerator runs on GPUs) to the denoiser
rewardtune's ``prepare_models`` sets up: a bf16 frozen base with fp32 LoRA weights. It writes what it saw.

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


def lora_unet(pipeline_dir: str):
    """The tiny pipeline's UNet as ``prepare_models`` sets it up under bf16, its LoRA B matrices made non-zero."""
    cfg = FinetuneConfig(model=pipeline_dir, output="unused", lora_rank=4, lora_alpha=4.0, mixed_precision="bf16")
    pipe, family = load_pipeline(pipeline_dir, torch.bfloat16)
    resolve_defaults(cfg, pipe, family)  # the model's LoRA targets
    unet = prepare_models(cfg, pipe, make_adapter(pipe, family), torch.device("cpu")).denoiser
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return unet


def inputs(unet):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, unet.config.in_channels, 8, 8, generator=gen)
    hidden = torch.randn(BATCH, 7, unet.config.cross_attention_dim, generator=gen)
    return x, torch.tensor([999, 700, 400, 100]), hidden


def loss(unet, rows=slice(None)):
    x, t, hidden = inputs(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x[rows], t[rows], encoder_hidden_states=hidden[rows]).sample
    return out.float().pow(2).mean()


def main(pipeline_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    unet = lora_unet(pipeline_dir)
    full_numel = {n: p.numel() for n, p in unet.named_parameters()}
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
    model = fsdp2_prepare_model(accelerator, unet)
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
        "units": sum(
            isinstance(m, FSDPModule) and any(c.__name__ == "BasicTransformerBlock" for c in type(m).__mro__)
            for m in model.modules()
        ),
    }
    out = Path(out_dir)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        save_file({n: g.contiguous() for n, g in grads.items()}, str(out / "grads.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
