"""FSDP as the project configures it, run for real: accelerate falls back to DDP on CPUs even when FSDP is asked
for, so a finetune run through ``accelerate launch`` would pass on DDP. Here ``tests/fsdp_worker.py`` takes the
settings of ``recipes/accelerate/fsdp.yaml`` as accelerate's launcher hands them to two CPU processes (gloo) and
applies accelerate's own FSDP2 wrapping to the denoiser ``prepare_models`` builds (bf16 base, fp32 LoRA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rewardtune.testing.cli import HANG_SECONDS, offline_env
from rewardtune.testing.flow_pipelines import build_tiny_flow_pipeline
from rewardtune.testing.pipelines import build_tiny_pipeline
from rewardtune.testing.wan_pipelines import save_tiny_wan_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsdp_worker  # noqa: E402  (the worker's model and loss, for the one-process reference)


@pytest.fixture
def wan_model(tmp_path):
    return save_tiny_wan_pipeline(tmp_path / "tiny_wan", num_layers=2)


@pytest.mark.parametrize("recipe,model", [("fsdp", "sd_model"), ("fsdp_wan", "wan_model")])
def test_fsdp_recipe_shards_the_lora_denoiser_and_gives_the_full_batch_gradient(recipe, model, request, tmp_path):
    """SD 1.x's UNet under fsdp.yaml and Wan's video transformer under fsdp_wan.yaml (WanTransformerBlock units)."""
    model_dir = str(request.getfixturevalue(model))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate" / f"{recipe}.yaml"), "--num_processes", "2", "--main_process_port", "0",
        str(ROOT / "tests/fsdp_worker.py"), model_dir, str(out),
    ]  # fmt: skip
    env = offline_env(ACCELERATE_USE_CPU="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_SECONDS, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    listed = yaml.safe_load((ROOT / "recipes/accelerate" / f"{recipe}.yaml").read_text())["fsdp_config"]
    for rep in reports:
        assert rep["world_size"] == 2 and rep["fsdp_version"] == 2
        assert rep["dtensors"] == rep["sharded_dim0"] == rep["parameters"]  # every parameter sharded on dim 0
        assert rep["local_numel"] < 0.6 * rep["full_numel"]  # each process holds about half
        assert rep["trainable_dtypes"] == ["torch.float32"] and "torch.bfloat16" in rep["frozen_dtypes"]
        assert rep["blocks"] == sorted(listed["fsdp_transformer_layer_cls_to_wrap"].split(","))
        assert rep["units"] == rep["block_count"] >= 2  # each of the recipe's blocks is its own shard unit
    # the same model, unsharded, on the whole batch in this process: FSDP's averaged gradient must equal it
    denoiser = fsdp_worker.lora_denoiser(model_dir)
    fsdp_worker.loss(denoiser).backward()
    ref = {n: p.grad.float() for n, p in denoiser.named_parameters() if p.requires_grad}
    grads = load_file(str(out / "grads.safetensors"))
    assert grads.keys() == ref.keys() and len(ref) > 0
    flat = torch.cat([grads[n].flatten() for n in ref])
    flat_ref = torch.cat([ref[n].flatten() for n in ref])
    # bf16 compute on both sides (FSDP casts the LoRA weights to bf16 for the forward; autocast does the same
    # for the reference's matmuls) and bf16 gradient reduction: a relative error of a few 1e-3
    assert float((flat - flat_ref).norm() / flat_ref.norm()) < 2e-2
    assert float(flat_ref.norm()) > 0


@pytest.mark.parametrize(
    "recipe,family", [("fsdp", "sd"), ("fsdp", "sdxl"), ("fsdp_sd3", "sd3"), ("fsdp_flux", "flux")]
)
def test_each_fsdp_recipe_names_block_classes_its_models_have(recipe, family, tmp_path):
    """accelerate refuses a listed block class that the model lacks, so each family's recipe must list exactly
    classes its denoiser contains (checked on the tiny pipelines, which use diffusers' own block classes)."""
    config = yaml.safe_load((ROOT / "recipes/accelerate" / f"{recipe}.yaml").read_text())["fsdp_config"]
    listed = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    if family in ("sd", "sdxl"):
        denoiser = build_tiny_pipeline(family, tokenizer_dir=tmp_path / "tok").unet
    else:
        denoiser = build_tiny_flow_pipeline(family, tokenizer_dir=tmp_path / "tok").transformer
    present = {type(m).__name__ for m in denoiser.modules()}
    assert config["fsdp_version"] == 2 and listed and listed <= present, listed - present
