"""``--quantize-base nf4|int8`` on the CPU: the frozen denoiser in bitsandbytes' 4-bit/8-bit layers under a trained
LoRA, on tiny real SD3, FLUX and SD 1.x pipelines. References are bitsandbytes' own dequantization and the stock
(unquantized) diffusers models and pipelines, never a second copy of our code."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

from rewardtune.cli import main
from rewardtune.finetune import Trainer, families
from rewardtune.finetune.models import (
    _quantized_component,
    cpu_quantization_problem,
    model_family,
    quantize_linears_on_cpu,
)
from rewardtune.testing.flow_pipelines import save_tiny_flow_pipeline
from rewardtune.testing.wan_pipelines import save_tiny_wan_pipeline

if importlib.util.find_spec("bitsandbytes") is None:
    pytest.skip("bitsandbytes is not installed (pip install bitsandbytes)", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip(
        "a CUDA GPU is here: --quantize-base loads through diffusers there, not this CPU path", allow_module_level=True
    )

import bitsandbytes as bnb  # noqa: E402

_PROBLEMS = {q: cpu_quantization_problem(q) for q in ("nf4", "int8")}
# every test but the refusal's needs both layers to work on this CPU
needs_cpu_backend = pytest.mark.skipif(
    any(_PROBLEMS.values()), reason=f"this bitsandbytes cannot train through its layers on the CPU: {_PROBLEMS}"
)

MSL = 16
LAYER = {
    "nf4": (bnb.nn.Linear4bit, bnb.nn.Params4bit, torch.uint8),
    "int8": (bnb.nn.Linear8bitLt, bnb.nn.Int8Params, torch.int8),
}


class Brightness(torch.nn.Module):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd_model):
    return {
        "sd3": save_tiny_flow_pipeline(tmp_path_factory.mktemp("q_sd3"), "sd3"),
        "flux": save_tiny_flow_pipeline(tmp_path_factory.mktemp("q_flux"), "flux"),
        "sd": sd_model,
    }


def _stock(path):
    pipe = DiffusionPipeline.from_pretrained(path, **({"safety_checker": None} if model_family(path) == "sd" else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser_name(pipe):
    return "unet" if hasattr(pipe, "unet") else "transformer"


def _dequantized(layer, quantize):
    """The weight bitsandbytes' own functions rebuild from what the layer stores."""
    if quantize == "nf4":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127.0


@needs_cpu_backend
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["sd3", "flux", "sd"])
def test_every_linear_of_the_denoiser_is_stored_in_4_or_8_bits(models, name, quantize):
    """Each ``nn.Linear`` of the stock denoiser is bitsandbytes' layer with packed uint8 (NF4) / int8 weights and
    no full-precision copy, and bitsandbytes' dequantization of it is the stock weight up to the format's error."""
    path = models[name]
    stock = getattr(_stock(path), _denoiser_name(_stock(path)))
    quantized = next(
        iter(
            _quantized_component(path, families.by_name(model_family(path)).denoiser, quantize, torch.float32).values()
        )
    )
    layer_cls, param_cls, dtype = LAYER[quantize]
    stock_linears = {n: m for n, m in stock.named_modules() if type(m) is torch.nn.Linear}
    q_linears = {n: m for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    assert stock_linears and set(q_linears) == set(stock_linears)
    worst = 0.0
    for n, layer in q_linears.items():
        assert type(layer) is layer_cls and type(layer.weight) is param_cls and layer.weight.dtype == dtype, n
        w = stock_linears[n].weight.detach()
        if quantize == "nf4":  # 4 bits a weight, packed two to a byte, one fp32 absmax per 64-weight block
            assert layer.weight.numel() * 2 >= w.numel() and layer.weight.quant_state.blocksize == 64
        else:
            assert layer.weight.shape == w.shape
        worst = max(worst, float((_dequantized(layer, quantize) - w).norm() / w.norm()))
    # NF4 has 16 levels per block's absmax (relative error ~0.1 for Gaussian-like weights); int8 has 255 per row
    assert 0 < worst < {"nf4": 0.15, "int8": 0.01}[quantize]


def _call_inputs(pipe, prompt="a red apple"):
    """The keyword arguments diffusers' pipeline passes to its denoiser on the first sampling step."""
    denoiser = getattr(pipe, _denoiser_name(pipe))
    seen = {}

    def hook(module, args, kwargs):
        if not seen:
            seen.update({"args": args, "kwargs": kwargs})

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    if hasattr(pipe, "tokenizer_3") or hasattr(pipe, "text_encoder_2") and not hasattr(pipe, "unet"):
        kw["max_sequence_length"] = MSL
    try:
        pipe([prompt], generator=torch.Generator().manual_seed(0), **kw)
    finally:
        handle.remove()
    return seen["args"], {k: v for k, v in seen["kwargs"].items() if k != "return_dict"}


def _lora_grads(denoiser, args, kwargs, seed=0):
    """Prediction, and the gradients of a fixed random projection of it w.r.t. a LoRA whose B is non-zero and w.r.t.
    the input latents, in eval mode after a forward without gradient (the trainer's order)."""
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    gen = torch.Generator().manual_seed(seed)
    lora = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n in sorted(lora):
            lora[n].copy_(torch.randn(lora[n].shape, generator=gen) * 0.1)
    with torch.no_grad():  # as the sampler's steps without gradient run first (bitsandbytes may repack then)
        denoiser(*args, **kwargs, return_dict=False)
    if args:  # the UNet takes its latents positionally, the transformers by keyword
        latents = args[0].detach().clone().requires_grad_(True)
        args, kwargs = (latents, *args[1:]), kwargs
    else:
        latents = kwargs["hidden_states"].detach().clone().requires_grad_(True)
        kwargs = {**kwargs, "hidden_states": latents}
    out = denoiser(*args, **kwargs, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out.float() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in lora.items()}
    return out.detach().float(), {**grads, "latents (what DRaFT backpropagates through)": latents.grad.clone()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_cpu_backend
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["sd3", "flux", "sd"])
def test_lora_prediction_and_gradient_on_the_quantized_base_follow_the_fp32_base(models, name, quantize):
    """The same LoRA on the quantized and the stock fp32 denoiser, the same inputs (the pipeline's own first call):
    prediction and gradients (LoRA and latents) agree to within a few times the per-weight quantization error measured on the
    same model (bitsandbytes' dequantized weights against the stock ones), and are not identical (the base is
    really quantized). A base of other weights is much further off, so the bound can fail."""
    path = models[name]
    pipe = _stock(path)
    args, kwargs = _call_inputs(pipe)
    stock = getattr(pipe, _denoiser_name(pipe))
    stock_weights = {n: m.weight.detach().clone() for n, m in stock.named_modules() if type(m) is torch.nn.Linear}
    ref_out, ref_grads = _lora_grads(stock, args, kwargs)
    quantized = next(
        iter(
            _quantized_component(path, families.by_name(model_family(path)).denoiser, quantize, torch.float32).values()
        )
    )
    weight_err = max(
        _rel(_dequantized(m, quantize), stock_weights[n])
        for n, m in quantized.named_modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    )
    q_out, q_grads = _lora_grads(quantized, args, kwargs)
    assert set(q_grads) == set(ref_grads)
    grad_err = _rel(
        torch.cat([q_grads[n].flatten() for n in sorted(q_grads)]),
        torch.cat([ref_grads[n].flatten() for n in sorted(ref_grads)]),
    )
    out_err = _rel(q_out, ref_out)
    assert 0 < out_err < 3 * weight_err and 0 < grad_err < 3 * weight_err, (out_err, grad_err, weight_err)
    other = getattr(_stock(path), _denoiser_name(pipe))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * p.std().nan_to_num() * 0.5)
    other_out, other_grads = _lora_grads(other, args, kwargs)
    assert _rel(other_out, ref_out) > 3 * out_err


@needs_cpu_backend
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_step_on_the_quantized_base_trains_the_lora_and_it_loads_into_the_stock_pipeline(
    models, name, quantize, tiny_cfg, library_log, tmp_path
):
    """One DRaFT-K step with ``quantize_base``: the base stays 4/8-bit under the LoRA, the LoRA moves, and the saved
    file loads with ``load_lora_weights`` into the unquantized stock pipeline: no missing or unexpected key logged,
    and every trained tensor arrives as trained."""
    cfg = tiny_cfg(
        models[name],
        tmp_path / "run",
        steps=1,
        lr=1e-2,
        k=2,
        eval_size=2,
        max_sequence_length=MSL,
        guidance_scale=3.0 if name == "sd3" else None,
        quantize_base=quantize,
    )
    trainer = Trainer(cfg, reward=Brightness())
    layer_cls, param_cls, dtype = LAYER[quantize]
    bases = [m for n, m in trainer.unet.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert bases and all(
        type(m) is layer_cls and type(m.weight) is param_cls and m.weight.dtype == dtype for m in bases
    )
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    metrics = trainer.step()
    after = {n: p.detach() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert metrics["grad_norm"] > 0 and all(torch.isfinite(p).all() for p in after.values())
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-3
    assert all(m.weight.dtype == dtype for m in bases)  # the optimizer step left the base quantized
    trainer.save_lora(tmp_path / "lora")

    pipe = _stock(models[name])
    with library_log() as log:
        pipe.load_lora_weights(tmp_path / "lora")
    assert log.key_problems() == [], log.messages
    # a transformer-only LoRA: diffusers says (at warning level) that the CLIP encoders got none, which loses no key
    assert [m for m in log.messages if "No LoRA keys associated to CLIPTextModel" not in m] == []
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}

    # diffusers names the adapter default_0; ours is the trainer's; compare by module path and A/B
    def key(n):
        return n.replace(".default_0.", ".").replace(".default.", ".")

    trained = {key(n): p for n, p in after.items()}
    assert {key(n) for n in loaded} == set(trained)
    for n, p in loaded.items():
        torch.testing.assert_close(p.detach().float(), trained[key(n)].float(), rtol=0, atol=0)


@needs_cpu_backend
def test_an_a14b_pair_quantizes_both_experts_and_trains_the_low_noise_lora(tiny_cfg, library_log, tmp_path):
    """--quantize-base on a Wan2.2-A14B-like pair: both experts load in 4 bits (the frozen high-noise one too: as large
    as the trained one; before, the loader quantized ``transformer`` alone, the expert that --lora-on low leaves
    frozen) but for the time embedder Wan keeps in fp32, as diffusers' quantizer leaves it (before, every Linear was
    converted and the first call failed), a DRaFT-K step (K=1: the low-noise side) moves transformer_2's LoRA and
    leaves both bases quantized, and the file loads into the unquantized stock pair's transformer_2 without a library message, as trained."""
    model = save_tiny_wan_pipeline(tmp_path / "pair", pair=True, euler=True)
    cfg = tiny_cfg(
        model, tmp_path / "run", steps=1, lr=5e-2, k=1, sample_steps=2, guidance_scale=1.0, eval_size=2,
        max_sequence_length=MSL, num_frames=5, frames="1", lora_on="low", quantize_base="nf4",
    )  # fmt: skip
    trainer = Trainer(cfg, reward=Brightness())
    pipe = trainer.pipe
    layer_cls, param_cls, dtype = LAYER["nf4"]
    for expert in (pipe.transformer, pipe.transformer_2):
        bases = {n: m for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
        # diffusers' quantizer leaves the modules WanTransformer3DModel keeps in fp32 (its forward casts the timestep
        # embedding to time_embedder's weight dtype, which a 4-bit weight's uint8 storage would break)
        kept = {n for n in bases if "condition_embedder.time_embedder." in n}
        assert len(kept) == 2 and all(type(bases[n]) is torch.nn.Linear for n in kept)
        assert all(type(m) is layer_cls and type(m.weight) is param_cls for n, m in bases.items() if n not in kept)
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    before = {n: p.detach().clone() for n, p in pipe.transformer_2.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.step()
    after = {n: p.detach() for n, p in pipe.transformer_2.named_parameters() if p.requires_grad}
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-4
    assert all(m.weight.dtype == dtype for e in (pipe.transformer, pipe.transformer_2) for m in e.modules()
               if type(m) is layer_cls)  # fmt: skip
    trainer.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora/transformer_2/pytorch_lora_weights.safetensors").is_file()

    stock = _stock(model)
    with library_log() as log:
        stock.load_lora_weights(tmp_path / "lora/transformer_2", load_into_transformer_2=True)
    assert log.messages == []
    loaded = {n.replace(".default_0.", "."): p for n, p in stock.transformer_2.named_parameters() if "lora_" in n}
    trained = {n.replace(".default.", "."): p for n, p in after.items()}
    assert loaded.keys() == trained.keys()
    for n, p in loaded.items():
        torch.testing.assert_close(p.detach().float(), trained[n].float(), rtol=0, atol=0)


@needs_cpu_backend
def test_cli_runs_with_quantize_base_on_the_cpu(models, released_ict, tiny_backbone, tmp_path, capsys):
    """``rewardtune finetune --quantize-base nf4`` no longer refuses a CPU whose bitsandbytes can do it."""
    out = tmp_path / "out"
    args = ["--model", models["flux"], "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone]
    args += ["--output", out, "--resolution", 32, "--sample-steps", 2, "--max-sequence-length", 8, "--steps", 1]
    args += ["--batch-size", 1, "--eval-size", 1, "--lora-rank", 2, "--k", 1, "--quantize-base", "nf4"]
    rc = main(["finetune", *map(str, args)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert (out / "summary.json").exists()


def test_a_bitsandbytes_that_cannot_quantize_on_the_cpu_gives_one_clear_line(models, tmp_path, capsys, monkeypatch):
    """The refusal comes from trying bitsandbytes' layer, not from the device type: with its 4-bit quantizer failing
    as one without a CPU backend fails, ``--quantize-base nf4`` stops before loading with one line naming it."""

    def no_cpu_backend(*args, **kwargs):
        raise NotImplementedError("quantize_4bit has no kernel registered for the cpu device\nsecond line")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_cpu_backend)
    args = ["--model", models["flux"], "--output", tmp_path / "out", "--resolution", 32, "--quantize-base", "nf4"]
    rc = main(["finetune", *map(str, args)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert last == (
        "rewardtune finetune: error: --quantize-base nf4: this bitsandbytes cannot train through its nf4 layers on "
        "the CPU (NotImplementedError: quantize_4bit has no kernel registered for the cpu device); use a CUDA GPU "
        "or --quantize-base none"
    )


@needs_cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_layer_passes_the_exact_gradient_to_its_input_after_a_forward_without_gradient(quantize, dtype):
    """The trainer samples its steps without gradient first, in eval mode, then backpropagates through later ones.
    bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a 4-bit weight for inference on such a forward, and its
    repacked matmul has no backward; the layers ``quantize_linears_on_cpu`` builds must keep giving the input the
    gradient of ``x @ W.T + b`` with W bitsandbytes' own dequantized weight. 256x128: repacking needs 32-row tiles,
    which the tiny pipelines' 16-wide layers never fill."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    model = quantize_linears_on_cpu(torch.nn.Sequential(linear), quantize, dtype).eval()
    layer = model[0]
    w = _dequantized(layer, quantize)  # before any forward: bitsandbytes moves the int8 row scales into the layer
    with torch.no_grad():
        model(torch.randn(3, 256, generator=gen).to(dtype))
    x = torch.randn(3, 256, generator=gen).to(dtype).requires_grad_(True)
    upstream = torch.randn(3, 128, generator=gen)
    y = model(x)
    (y.float() * upstream).sum().backward()
    # against bitsandbytes' own dequantized weight the only error left is the compute dtype's rounding (bf16: 2^-8
    # relative) and, for int8 (LLM.int8), the input's own row-wise int8 rounding (1/254 of the row's largest value)
    assert x.grad is not None and _rel(x.grad.float(), upstream @ w) < 1e-2
    assert _rel(y.detach().float(), x.detach().float() @ w.T + layer.bias.detach().float()) < 1e-2
