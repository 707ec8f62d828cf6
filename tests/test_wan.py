"""Wan 2.1 / 2.2 text-to-video (``WanPipeline``) in rewardtune finetune, on tiny real pipelines saved in diffusers format
(offline, CPU): a Wan2.1-like one, an A14B-like pair (``transformer_2``, ``boundary_ratio``) and a TI2V-5B-like one
(``expand_timesteps``). References are diffusers' own pipeline, VAE and LoRA loader, never our code again."""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rewardtune.cli import main
from rewardtune.errors import OfflineError, UserError
from rewardtune.finetune import FinetuneConfig, Trainer, families, sample, training_scheduler
from rewardtune.finetune import video as video_mod
from rewardtune.finetune.defaults import check_family_options, resolve_defaults
from rewardtune.finetune.families.wan import WAN_TARGETS, comfyui_name
from rewardtune.finetune.flow import FlowMatchSampler
from rewardtune.finetune.lora import export_comfyui
from rewardtune.finetune.models import assemble_pipeline, make_adapter, model_family, resolve_model
from rewardtune.finetune.sampler import Plan
from rewardtune.finetune.trainer import _checkpointed_cached, cache_slots, checkpoint_vae_decoder
from rewardtune.finetune.video import (
    HostOffload,
    VideoReward,
    check_host_room,
    decode_frames,
    frame_indices,
    host_bytes,
    latent_frames_for,
    parse_frames,
    temporal_consistency,
)
from rewardtune.plan import predict_peak_memory
from rewardtune.plan.architectures import build_pipeline
from rewardtune.sizes import check_size
from rewardtune.testing import tiny_clip_config
from rewardtune.testing.cli import run_cli
from rewardtune.testing.wan_pipelines import (
    BOUNDARY_RATIO,
    FLOW_SHIFT,
    build_tiny_wan_pipeline,
    save_tiny_wan_pipeline,
    tiny_wan_transformer,
)

PROMPTS = ["a red apple", "a cat"]
MSL = 16  # UMT5 tokens per prompt (the pipeline's default is 512)
FRAMES = 5  # 4k + 1: two latent frames
ROOT = Path(__file__).resolve().parents[1]
KW = dict(height=32, width=32, num_frames=FRAMES, max_sequence_length=MSL)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    """A tiny Wan2.1-like directory with the hub's scheduler kind (UniPC, flow sigmas, flow_shift 3)."""
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def euler_model(tmp_path_factory):
    """The same, saved with the scheduler WanPipeline's signature names (flow-matching Euler, shift 3): a stock
    pipeline samples it exactly as the trainer does, so trained frames can be compared."""
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan_euler"), euler=True)


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory):
    """A tiny Wan2.2-A14B-like directory: two transformers, boundary_ratio 0.875, the Euler scheduler."""
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan_pair"), pair=True, euler=True)


def test_the_tiny_pipeline_is_a_real_wan_pipeline(wan_model):
    """The registry reads model_index.json's class; parts are Wan's; every LoRA target names modules of every block."""
    pipe = WanPipeline.from_pretrained(wan_model)
    assert model_family(wan_model) == "wan"
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel" and type(pipe.vae).__name__ == "AutoencoderKLWan"
    assert type(pipe.scheduler) is UniPCMultistepScheduler and pipe.scheduler.config.flow_shift == FLOW_SHIFT
    names = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in WAN_TARGETS:
        for block in range(len(pipe.transformer.blocks)):
            assert any(n.startswith(f"blocks.{block}.") and n.endswith("." + target) for n in names), (block, target)
    parts = {k: v for k, v in pipe.components.items() if k != "tokenizer"}
    built = assemble_pipeline("wan", parts, pipe.tokenizer)
    assert type(built) is WanPipeline and built.tokenizer is pipe.tokenizer


# ----- sampling: the trainer's sampler is the pipeline's ---------------------------------------------
def _euler(pipe):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["wan21", "a14b-pair", "ti2v-expand-timesteps"])
def test_sample_returns_the_pipelines_latents(kind):
    """``sample`` equals ``WanPipeline(..., output_type='latent')`` in fp32, from the same generator (and on the Wan2.1
    model from the same latents), without guidance and with it (the empty negative prompt); on the A14B pair (the
    expert switch at the boundary, the low-noise expert with a guidance of its own) and with TI2V-5B's per-token
    timesteps."""
    pipe = _euler(build_tiny_wan_pipeline(pair=kind == "a14b-pair", expand_timesteps=kind.startswith("ti2v")))
    for g in (1.0, 3.0):
        kw = dict(num_inference_steps=3, guidance_scale=g, **KW)
        if kind == "a14b-pair" and g > 1:
            kw["guidance_scale_2"] = 1.5  # the low-noise expert's own guidance
        ref = pipe(list(PROMPTS), generator=_gen(0), output_type="latent", **kw).frames
        ours = sample(pipe, PROMPTS, generator=_gen(0), **kw)
        assert ours.shape == ref.shape == (2, 16, 2, 4, 4)
        assert float((ours - ref).abs().max()) <= 1e-4
        if kind != "wan21":
            continue  # (the same latents: once is enough)
        noise = torch.randn(ref.shape, generator=_gen(1))
        ref = pipe(list(PROMPTS), latents=noise, output_type="latent", **kw).frames
        assert float((sample(pipe, PROMPTS, latents=noise, **kw) - ref).abs().max()) <= 1e-4


def test_sample_at_a_non_square_size_returns_the_pipelines_latents(wan_model):
    """At 32x48 (``--resolution 32x48``: WanPipeline's height and width) ``sample`` equals the pipeline, guided, and
    the adapter's latent shape is the pipeline's; a side the 2x2 patches of 8x latents cannot take is one line
    naming the multiple and the side."""
    pipe = _euler(build_tiny_wan_pipeline())
    kw = dict(KW, height=32, width=48, num_inference_steps=2, guidance_scale=3.0)
    ref = pipe(list(PROMPTS), generator=_gen(0), output_type="latent", **kw).frames
    ours = sample(pipe, PROMPTS, generator=_gen(0), **kw)
    assert ours.shape == ref.shape == (2, 16, 2, 4, 6)
    assert float((ours - ref).abs().max()) <= 1e-4
    adapter = make_adapter(pipe, "wan", FinetuneConfig(output="o", num_frames=FRAMES))
    assert adapter.latent_shape("32x48") == ref.shape[1:]
    assert adapter.native_resolution() == "480x832"
    with pytest.raises(UserError, match=r"^--resolution 40: .*a multiple of 16 .*\[--resolution 32x40: the width\]$"):
        check_size(adapter, "32x40")


def test_the_experts_switch_where_the_pipeline_switches():
    """On the A14B pair the trainer's sampler calls ``transformer`` on the same steps as WanPipeline (timestep at or
    above 0.875 x 1000) and ``transformer_2`` on the others, both sides of the boundary present."""
    pipe = _euler(build_tiny_wan_pipeline(pair=True))
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, a, kw, out, name=name: calls.append((name, float(kw["timestep"][0]))),
                                with_kwargs=True)
        for name, m in (("high", pipe.transformer), ("low", pipe.transformer_2))
    ]  # fmt: skip
    try:
        kw = dict(num_inference_steps=6, guidance_scale=1.0, **KW)
        pipe(list(PROMPTS), generator=_gen(0), output_type="latent", **kw)
        theirs, calls[:] = list(calls), []
        sample(pipe, PROMPTS, generator=_gen(0), **kw)
    finally:
        for h in hooks:
            h.remove()
    assert [c[0] for c in calls] == [c[0] for c in theirs]
    assert [c[1] for c in calls] == pytest.approx([c[1] for c in theirs], abs=1e-4)
    assert {c[0] for c in calls} == {"high", "low"}
    assert all((name == "high") == (t >= BOUNDARY_RATIO * 1000) for name, t in calls)


def test_the_hub_scheduler_gives_its_sigmas(wan_model):
    """With the hub's UniPC flow scheduler the Euler steps run on UniPC's own shifted sigmas (timesteps within 1 of its
    integer ones), ending at 0; latents are (16, (F - 1)/4 + 1, H/8, W/8)."""
    pipe = WanPipeline.from_pretrained(wan_model)
    adapter = make_adapter(pipe, "wan")
    sampler = FlowMatchSampler(training_scheduler(pipe), 5, **adapter.sampler_options(32))
    unipc = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    unipc.set_timesteps(5)
    assert sampler.sigmas.tolist() == pytest.approx(unipc.sigmas.tolist(), abs=1e-5)
    assert (sampler.timesteps - unipc.timesteps.float()).abs().max() <= 1
    assert adapter.latent_shape(32) == (16, 21, 4, 4)  # 81 frames (the pipeline's default) -> 21 latent frames


# ----- the VAE: prefix decoding and checkpointing ------------------------------------------------------------
def test_a_prefix_of_latent_frames_decodes_the_same_leading_frames(wan_model):
    """AutoencoderKLWan is causal in time: decoding the first c latent frames gives exactly the first 4(c-1)+1 frames
    of the full decode; ``decode_frames`` (checkpointed) gives them with the same gradients; and the VAE decoder's
    layer checkpointing (``checkpoint_vae_decoder``) leaves a multi-frame decode unchanged."""
    vae = WanPipeline.from_pretrained(wan_model).vae
    z = torch.randn(1, 16, 3, 4, 4, generator=_gen(3))
    with torch.no_grad():
        full = vae.decode(z).sample
    assert full.shape[2] == 9
    for c, frames in ((1, 1), (2, 5)):
        with torch.no_grad():
            assert torch.equal(vae.decode(z[:, :, :c]).sample, full[:, :, :frames])
        assert latent_frames_for(frames - 1, 4) == c
    weight = torch.randn(1, 3, 5, 32, 32, generator=_gen(4))
    grads = []
    for checkpointed in (False, True):
        zz = z.clone().requires_grad_(True)
        out = decode_frames(vae, zz, 4, 4, checkpointed=checkpointed)
        assert torch.equal(out.detach(), full[:, :, :5])
        (out * weight).sum().backward()
        grads.append(zz.grad)
    assert grads[0][:, :, 2].abs().max() == 0 and grads[0][:, :, :2].abs().max() > 0  # the 3rd latent never decoded
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    checkpoint_vae_decoder(vae)
    zz = z.clone().requires_grad_(True)
    torch.testing.assert_close(vae.decode(zz).sample, full, atol=0, rtol=0)


class _Recording(HostOffload):
    """``HostOffload`` that copies on a CPU too, keeping a weak reference to every tensor it packs."""

    def __init__(self):
        super().__init__(always=True)
        self.packed = []

    def pack(self, t):
        self.packed.append(weakref.ref(t))
        return super().pack(t)


@pytest.mark.parametrize("wan22", [False, True])
def test_the_checkpoint_per_latent_frame_decodes_and_differentiates_as_the_vae_does(wan_model, wan22):
    """With gradients each latent frame's decoder call is a checkpoint of its own (video._decode_by_frame, the loop
    of AutoencoderKLWan._decode) and inside it each decoder layer one too, with the cache slots it reads as inputs
    (trainer.checkpoint_vae_decoder): the whole video's pixels equal ``vae.decode``'s and the latents' gradients the
    uncheckpointed decode's, for Wan 2.1's VAE and a tiny Wan 2.2-style one (residual, patch size 2, 12 channels),
    also with what the frame checkpoints hold copied to the host (``HostOffload``): then none of the tensors they
    hold is alive past the forward pass but the host copy (on an accelerator: its memory is free until the backward
    pass)."""
    if wan22:
        torch.manual_seed(5)
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=16, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
            in_channels=12, out_channels=12, patch_size=2, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
            scale_factor_spatial=16,
        ).eval()  # fmt: skip
    else:
        vae = WanPipeline.from_pretrained(wan_model).vae
    z = torch.randn(1, vae.config.z_dim, 3, 4, 4, generator=_gen(6))
    with torch.no_grad():
        full = vae.decode(z).sample
    weight = torch.randn(full.shape, generator=_gen(7))
    grads = []
    for checkpointed in (False, True, "layers", "host"):
        if checkpointed == "layers":
            checkpoint_vae_decoder(vae)  # as the trainer sets it up with gradient checkpointing
        host = _Recording() if checkpointed == "host" else None
        zz = z.clone().requires_grad_(True)
        out = decode_frames(vae, zz, None, 4, checkpointed=bool(checkpointed), host=host)
        torch.testing.assert_close(out.detach(), full, atol=1e-6, rtol=0)
        if host is not None:
            gc.collect()
            # each later frame's input and cache slots (more than one frame's worth of slots)
            assert len(host.packed) > cache_slots(vae.decoder) and host.bytes > 0
            assert [r for r in host.packed if r() is not None and r().dim() == 5 and r().shape[2] <= 2] == []
        (out * weight).sum().backward()
        grads.append(zz.grad)
    assert grads[0][:, :, 2].abs().max() > 0  # the last latent frame is decoded and reached
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-6, rtol=1e-5)


def test_a_decoder_layer_advances_the_cache_by_its_counted_slots(wan_model):
    """``cache_slots``: Wan's residual block reads 2 slots, the temporal upsampler 1, attention none; a layer that
    advances the cache by another count is an error, not a silently shifted cache."""
    vae = WanPipeline.from_pretrained(wan_model).vae
    up = vae.decoder.up_blocks
    assert cache_slots(up[0].resnets[0]) == 2
    assert [cache_slots(u.upsamplers[0]) for u in up if u.upsamplers is not None] == [1, 1, 0]
    cache, idx = [None] * vae._cached_conv_counts["decoder"], [0]
    with torch.no_grad():  # the decoder's own count of the slots it advances (first chunk, then a later one)
        for first in (True, False):
            idx[0] = 0
            vae.decoder(torch.zeros(1, 16, 1, 4, 4), feat_cache=cache, feat_idx=idx, first_chunk=first)
            assert idx[0] == cache_slots(vae.decoder)
    checkpoint_vae_decoder(vae)
    layer = up[0].resnets[0]
    layer.forward = _checkpointed_cached(lambda x, cache, at: x, 2, "a layer that reads no cache")
    cache = [None] * vae._cached_conv_counts["decoder"]
    with pytest.raises(RuntimeError, match="advanced the VAE's feature cache by 0 slots, not 2"):
        layer(torch.zeros(1, 1, 1, 1, 1, requires_grad=True), cache, [0])


# ----- the video reward ------------------------------------------------------------------------------
class FrameMean(torch.nn.Module):
    """Each image's mean pixel: a per-frame reward whose values a test can compute by hand."""

    def forward(self, images, prompts):
        assert images.dim() == 4
        return images.mean(dim=(1, 2, 3))


def test_video_reward_scores_the_chosen_frames_and_aggregates():
    """Frames spread evenly (first and last), the reward per frame with each video's prompt, mean / min / weighted,
    differentiable in the chosen frames' pixels only; temporal consistency is 1 for a still video, less for one
    that changes."""
    assert frame_indices(33, 4) == [0, 11, 21, 32] and frame_indices(9, None) == list(range(9))
    assert frame_indices(9, 1) == [4] and parse_frames("all") is None and parse_frames("3") == 3
    videos = torch.rand(2, 3, 9, 8, 8, generator=_gen(0), requires_grad=True)
    per = videos.detach().mean(dim=(1, 3, 4))  # (B, F)
    idx = [0, 4, 8]
    assert torch.allclose(VideoReward(FrameMean(), idx)(videos, PROMPTS), per[:, idx].mean(1))
    assert torch.allclose(VideoReward(FrameMean(), idx, "min")(videos, PROMPTS), per[:, idx].min(1).values)
    weighted = VideoReward(FrameMean(), idx, "weighted", [1, 0, 3])(videos, PROMPTS)
    assert torch.allclose(weighted, (per[:, 0] + 3 * per[:, 8]) / 4)
    weighted.sum().backward()
    assert videos.grad[:, :, [0, 8]].abs().min() > 0 and videos.grad[:, :, [1, 2, 3, 4, 5, 6, 7]].abs().max() == 0
    still = torch.rand(1, 3, 1, 8, 8).expand(1, 3, 5, 8, 8)
    assert temporal_consistency(still) == pytest.approx(1.0)
    assert temporal_consistency(torch.rand(1, 3, 5, 8, 8, generator=_gen(1))) < 0.5
    for bad, expect in (
        (("0",), "--frames '0'"),
        (("2", "weighted"), "needs --frame-weights"),
        (("2", "weighted", [1, 2, 3]), "gives 3 weights for --frames 2"),
        (("2", "mean", [1, 2]), "applies to --frame-aggregate weighted"),
    ):
        with pytest.raises(UserError, match=expect):
            parse_frames(*bad)


# ----- training ------------------------------------------------------------------------------------
class Brightness(torch.nn.Module):
    """The mean pixel of an image: a per-frame reward any generator can move."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="session")
def wan_cfg(tiny_cfg):
    """``tiny_cfg`` for the tiny Wan models: no guidance, two evaluation prompts, short prompts, 5-frame videos of
    which frames 0 and 4 are scored."""
    return lambda model, output, **kw: tiny_cfg(
        model, output, **{"lr": 5e-2, "guidance_scale": 1.0, "eval_size": 2, "max_sequence_length": MSL,
                          "num_frames": FRAMES, "frames": "2", **kw}
    )  # fmt: skip


@pytest.fixture(scope="module")
def wan_trainer(wan_model, tmp_path_factory, wan_cfg):
    """A trainer on the tiny Wan2.1-like model; the method is read from its config at every step, so tests switch it."""
    return Trainer(wan_cfg(wan_model, tmp_path_factory.mktemp("wan_methods"), refl_min=0.0), reward=Brightness())


@pytest.mark.parametrize("method", ["draft-k", "draft-lv", "refl", "alignprop"])
def test_each_method_raises_the_reward_of_its_batch(wan_trainer, method, step_raises_reward):
    trainer = wan_trainer
    n = step_raises_reward(trainer, method)
    assert n == (2 * 3 if method == "draft-lv" else 2)  # draft-lv adds lv_samples=2 re-noised copies


def test_k_decides_which_steps_carry_gradients(wan_trainer, grads_per_step):
    """The reward (on decoded frames 0 and 4) reaches exactly the last K denoiser calls, with a positive gradient for
    every sample; AlignProp's per-sample truncation points too. The video reward scores frames 0 and 4 and the
    decode stops at frame 4, the video's last."""
    trainer = wan_trainer
    assert trainer.reward.indices == [0, FRAMES - 1] and trainer.latent_shape == (16, 2, 4, 4)
    assert trainer.adapter.lora_on == "high" and trainer.unet is trainer.pipe.transformer  # one transformer
    for k in (1, 3):
        grads = grads_per_step(trainer, Plan([3 - k] * 2, 3))
        assert [g is not None for g in grads] == [i >= 3 - k for i in range(3)]
        assert all(min(g) > 0 for g in grads if g is not None)
    grads = grads_per_step(trainer, Plan([2, 0], 3))
    assert grads[0][0] == 0 and grads[0][1] > 0 and grads[1][0] == 0 and grads[1][1] > 0
    trainer.unet.zero_grad(set_to_none=True)


def _load_as_told(pipe, directory, calls, library_log) -> None:
    """Run the diffusers calls the run tells the user (summary.json's ``load``) on a stock ``pipe``: no library
    warning may come (a key that lands nowhere, a file that is not a LoRA)."""
    with library_log() as log:
        for call in calls:
            eval(call, {"pipe": pipe})  # pipe.load_lora_weights(...)
    assert log.messages == []


def _lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}


def _changed(before: dict, model) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_the_a14b_pair_trains_the_expert_of_the_gradient_steps(
    pair_model, tmp_path, library_log, stock_pipeline, batch_reward, wan_cfg
):
    """The default --lora-on is the expert(s) of the gradient steps (DRaFT-K K=1: the low-noise transformer_2); the
    LoRA lands there only, the other expert stays frozen, and a step raises the reward of its batch. The LoRA is
    written as transformer_2/pytorch_lora_weights.safetensors only, so a plain ``load_lora_weights(DIR)`` fails (it
    would put it into transformer); the call the run names (``load_into_transformer_2=True``) loads it into a stock
    pair without a warning and gives the trained frames. --lora-on high puts it on transformer."""
    trainer = Trainer(wan_cfg(pair_model, tmp_path / "a", k=1, sample_steps=4, frames="1"), reward=Brightness())
    pipe = trainer.pipe
    assert trainer.adapter.lora_on == "low" == trainer.cfg.lora_on and trainer.unet is pipe.transformer_2
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    before, _ = batch_reward(trainer, 0)
    trainer.step()
    assert batch_reward(trainer, 0)[0] > before
    out = tmp_path / "lora"
    assert trainer.save_lora(out) == out / "transformer_2" / "pytorch_lora_weights.safetensors"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "transformer_2/pytorch_lora_weights.safetensors"
    ]
    trainer.unet.eval()
    trained = trainer.generate(PROMPTS[:1], seed=5)
    stock = stock_pipeline(pair_model)
    with pytest.raises(OSError, match="pytorch_lora_weights"):
        stock.load_lora_weights(out)  # the plain call: no LoRA file in DIR
    calls = trainer.adapter.lora_load_calls(out)
    assert len(calls) == 1 and "load_into_transformer_2=True" in calls[0]
    _load_as_told(stock, out, calls, library_log)
    assert stock.get_list_adapters() == {"transformer_2": ["low"]}
    kw = dict(num_inference_steps=4, guidance_scale=1.0, **KW)
    loaded = stock(PROMPTS[:1], generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    high = make_adapter(pipe, "wan", wan_cfg(pair_model, tmp_path / "b", lora_on="high", k=3))  # K=3 of 3: both sides
    assert high.denoiser is pipe.transformer and high.frozen_expert is pipe.transformer_2
    with pytest.raises(UserError, match=r"^--lora-on high: the steps that carry gradients \(3-3 of 3\) all run on the "
                                        r"low-noise expert, so this LoRA would get no gradient; use --lora-on low or both"):  # fmt: skip
        make_adapter(pipe, "wan", wan_cfg(pair_model, tmp_path / "b", lora_on="high", k=1))


def test_the_default_lora_on_is_the_experts_the_gradient_steps_reach():
    """On the hub's 40-step schedule (UniPC flow sigmas, shift 3, boundary 0.875: 13 high-noise steps, 27 low-noise)
    DRaFT-K's last K steps reach the high-noise expert from K = 28: the default is ``low`` below, ``both`` from there;
    AlignProp (K up to all steps) ``both``; ReFL's stops (0.7-1.0 of the steps) ``low``; DRaFT-LV ``low``."""
    pipe = build_tiny_wan_pipeline(pair=True)

    def default(**kw):
        cfg = FinetuneConfig(output="o", num_frames=FRAMES, sample_steps=40, **kw)
        return make_adapter(pipe, "wan", cfg).lora_on

    timesteps = make_adapter(pipe, "wan", FinetuneConfig(output="o", num_frames=FRAMES))._timesteps(40)
    assert int((timesteps >= BOUNDARY_RATIO * 1000).sum()) == 13
    assert [default(k=k) for k in (1, 27, 28, 40)] == ["low", "low", "both", "both"]
    assert default(method="alignprop") == "both" and default(method="refl") == "low"
    assert default(method="draft-lv") == "low" and default(method="refl", refl_min=0.2, refl_max=0.3) == "high"


def test_both_experts_train_and_load_as_the_run_says(
    pair_model, tmp_path, library_log, stock_pipeline, batch_reward, wan_cfg
):
    """--lora-on both (the default where the gradient steps span the boundary: K=2 of 2 steps, t = 1000 and 8.9):
    one optimizer over both experts' LoRA, each called through its own prepared model; a step spanning the boundary
    changes both and raises the reward, a step on the low-noise side only (K=1) changes transformer_2's alone. The two
    files load into a stock pair by the two diffusers calls the run names, without a warning, and give the trained
    frames; the base (adapters off, both experts: the "before" videos, the regulariser's calls) gives the stock pair's.
    An --init-lora without transformer_2's file is one line naming it."""
    trainer = Trainer(wan_cfg(pair_model, tmp_path / "a", k=2, sample_steps=2, frames="1"), reward=Brightness())
    pipe = trainer.pipe
    assert trainer.adapter.lora_on == "both" and trainer.adapter.frozen_expert is None
    assert trainer.model_train == {"transformer": trainer.models_train[0], "transformer_2": trainer.models_train[1]}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for m in (pipe.transformer, pipe.transformer_2) for p in m.parameters() if p.requires_grad
    }
    high, low = _lora_weights(pipe.transformer), _lora_weights(pipe.transformer_2)
    assert high and low
    before, _ = batch_reward(trainer, 0)
    trainer.step()
    assert batch_reward(trainer, 0)[0] > before
    assert _changed(high, pipe.transformer) and _changed(low, pipe.transformer_2)
    high, low = _lora_weights(pipe.transformer), _lora_weights(pipe.transformer_2)
    trainer.cfg.k = 1  # the last step only: low noise
    trainer.optimizer.state.clear()
    trainer.step()
    assert not _changed(high, pipe.transformer) and _changed(low, pipe.transformer_2)
    out = tmp_path / "lora"
    trainer.save_lora(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "pytorch_lora_weights.safetensors",
        "transformer_2/pytorch_lora_weights.safetensors",
    ]
    for model in trainer.models_train:
        model.eval()
    trained, base = trainer.generate(PROMPTS[:1], seed=5), trainer.generate(PROMPTS[:1], seed=5, lora=False)
    stock = stock_pipeline(pair_model)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, **KW)
    plain = stock(PROMPTS[:1], generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(base, plain, atol=1e-5, rtol=0)
    cond, x = trainer.encode(PROMPTS[:1]), torch.randn(1, 16, 2, 4, 4, generator=_gen(6))
    for t, expert in ((1000.0, stock.transformer), (8.9, stock.transformer_2)):  # the regulariser's base calls
        t = torch.full((1,), t)
        with torch.no_grad():
            ref = expert(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden, return_dict=False)[0]
            torch.testing.assert_close(cond.call(trainer._base_unet, x, t), ref, atol=1e-6, rtol=0)
            assert float((cond.call(trainer.model_train, x, t) - ref).abs().max()) > 1e-3
    _load_as_told(stock, out, trainer.adapter.lora_load_calls(out), library_log)
    assert stock.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}
    loaded = stock(PROMPTS[:1], generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    assert float((trained - base).abs().max()) > 1e-3
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    half = tmp_path / "high_only"
    half.mkdir()
    (half / "pytorch_lora_weights.safetensors").write_bytes((out / "pytorch_lora_weights.safetensors").read_bytes())
    cfg = wan_cfg(pair_model, tmp_path / "b", k=2, sample_steps=2, init_lora=str(half))
    with pytest.raises(UserError, match=r"^--init-lora: '.*high_only' is not a LoRA; expected a directory holding "
                                        r"transformer_2/pytorch_lora_weights.safetensors"):  # fmt: skip
        Trainer(cfg, reward=Brightness())


# ----- the LoRA a user loads ------------------------------------------------------------------------
GUIDED = 2.0


@pytest.fixture(scope="module")
def trained_lora(euler_model, tmp_path_factory, wan_cfg):
    """One guided step (transformer and VAE decode checkpointed), the LoRA saved with ``WanPipeline.save_lora_weights``,
    and the videos the trainer then makes: (LoRA directory, videos)."""
    out = tmp_path_factory.mktemp("wan_lora")
    cfg = wan_cfg(euler_model, out, guidance_scale=GUIDED, gradient_checkpointing=True, lora_alpha=8.0)
    trainer = Trainer(cfg, reward=Brightness())
    trainer.step()
    trainer.save_lora(out / "lora")
    trainer.unet.eval()
    return out / "lora", trainer.generate(PROMPTS, seed=5)


def test_saved_lora_loads_into_the_stock_pipeline_and_gives_the_trained_frames(
    euler_model, trained_lora, library_log, stock_pipeline
):
    """``pipe.load_lora_weights(dir)`` on a fresh WanPipeline loads every tensor without a warning, and the stock
    pipeline, guided as the run was, makes the trainer's own frames (all 5)."""
    directory, trained = trained_lora
    kw = dict(num_inference_steps=3, guidance_scale=GUIDED, **KW)
    pipe = stock_pipeline(euler_model)
    base = pipe(list(PROMPTS), generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    with library_log() as log:
        pipe.load_lora_weights(directory)
    assert log.messages == []
    loaded = pipe(list(PROMPTS), generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    assert trained.shape == (2, 3, FRAMES, 32, 32)
    assert float((trained - base).abs().max()) > 1e-3  # the LoRA changed the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    with safe_open(str(directory / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer"}
    assert any(".attn2.to_k." in k for k in keys) and any(".ffn.net.2." in k for k in keys)


# ComfyUI (Comfy-Org/ComfyUI at a125cd84b054a57729b5eecab930ca9408719832), read, not run: comfy/ldm/wan/model.py's
# WanModel has blocks.<i>.self_attn.{q,k,v,o} and blocks.<i>.cross_attn.{q,k,v,o} (Linear) and blocks.<i>.ffn, a
# Sequential(Linear, GELU, Linear): ffn.0 and ffn.2; comfy/lora.py's model_lora_keys_unet maps, for a Wan model, the
# names "diffusion_model.<name>" and "lora_unet_<name with _>" of every "diffusion_model.<name>.weight" and nothing
# for diffusers names (its SD3, Flux, PixArt, HunyuanVideo, QwenImage branches only); comfy/weight_adapter/lora.py
# reads <key>.lora_B.weight / <key>.lora_A.weight with the scale <key>.alpha / rank, 1.0 without an alpha tensor.
def comfyui_wan_keys(layers: int) -> set[str]:
    linears = [f"{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo"] + ["ffn.0", "ffn.2"]
    return {f"diffusion_model.blocks.{i}.{leaf}" for i in range(layers) for leaf in linears}


def test_comfyui_export_names_comfyuis_wan_modules_and_loads_back_in_diffusers(
    euler_model, trained_lora, library_log, stock_pipeline
):
    """``--export comfyui`` (``lora.export_comfyui``): every key of the written file is one ComfyUI's Wan key map holds
    (none of the diffusers file's is: the reason for the export), with no alpha tensor (the trained scale is in
    lora_B); diffusers' own reader of such files (``_convert_non_diffusers_wan_lora_to_diffusers``) gives back the
    diffusers file's tensors exactly, and ``pipe.load_lora_weights`` of it makes the trained frames without a warning.
    All 300 LoRA modules of the full-size 1.3B transformer have ComfyUI names; a module outside them is one line."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers  # noqa: PLC0415

    directory, trained = trained_lora
    path = export_comfyui(directory / "pytorch_lora_weights.safetensors", "wan")
    assert path.name == "pytorch_lora_weights_comfyui.safetensors"
    ours = load_file(str(path))
    diffusers_file = load_file(str(directory / "pytorch_lora_weights.safetensors"))
    layers = WanPipeline.from_pretrained(euler_model).transformer.config.num_layers
    modules = {k.rsplit(".lora_", 1)[0] for k in ours}
    assert {k.rsplit(".lora_", 1)[1] for k in ours} == {"A.weight", "B.weight"}
    assert modules == comfyui_wan_keys(layers)  # every default target, each a ComfyUI weight
    assert not {k.rsplit(".lora_", 1)[0] for k in diffusers_file} & comfyui_wan_keys(layers)
    back = _convert_non_diffusers_wan_lora_to_diffusers(dict(ours))  # with diffusers' "transformer." prefix
    assert back.keys() == diffusers_file.keys()
    assert all(torch.equal(back[k], v) for k, v in diffusers_file.items())
    pipe = stock_pipeline(euler_model)
    with library_log() as log:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert log.messages == []
    kw = dict(num_inference_steps=3, guidance_scale=GUIDED, **KW)
    loaded = pipe(list(PROMPTS), generator=_gen(5), output_type="pt", **kw).frames.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    full = build_pipeline("wan21-t2v-1.3b", torch.bfloat16, "meta").transformer
    targeted = [
        n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in WAN_TARGETS)
    ]  # fmt: skip
    named = {f"diffusion_model.{comfyui_name(n)}" for n in targeted if comfyui_name(n) is not None}
    assert len(targeted) == 300 and named == comfyui_wan_keys(full.config.num_layers)
    assert comfyui_name("proj_out") is None and comfyui_name("blocks.0.norm2") is None
    odd = directory.parent / "odd"
    odd.mkdir(exist_ok=True)
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 4)}, str(odd / "pytorch_lora_weights.safetensors"))
    with pytest.raises(UserError, match="ComfyUI's wan model has no module for 'proj_out'"):
        export_comfyui(odd / "pytorch_lora_weights.safetensors", "wan")
    assert not (odd / "pytorch_lora_weights_comfyui.safetensors").exists()


# ----- the command line ------------------------------------------------------------------------------
def test_cli_finetunes_resumes_and_saves_before_after_videos(pair_model, released_ict, tiny_backbone, tmp_path):
    """A real ``rewardtune finetune`` process on the tiny A14B-like pair with ICT on 2 frames, K=2 of 2 steps (one
    each side of the boundary: --lora-on both by default), then ``--resume`` to one more step, which takes both
    experts' LoRA from the checkpoint and continues; the run names the two diffusers calls that load its files, and
    the evaluations log temporal consistency and write before/after GIFs; ``--export comfyui`` writes each expert's
    file in ComfyUI's names."""
    out = tmp_path / "run"
    args = ["--model", pair_model, "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone]
    args += ["--output", out, "--resolution", 32, "--num-frames", 5, "--frames", 2, "--batch-size", 1]
    args += ["--eval-size", 1, "--lora-rank", 2, "--k", 2, "--sample-steps", 2, "--max-sequence-length", 8]
    args += ["--checkpoint-every", 1, "--guidance-scale", 1]
    files = ["pytorch_lora_weights.safetensors", "transformer_2/pytorch_lora_weights.safetensors"]

    def run(*extra):
        res = run_cli("finetune", *args, "--no-gradient-checkpointing", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert json.loads(res.stdout[res.stdout.index("{") :])["load"] == summary["load"]  # the end-of-run message
        return summary

    def lora(directory):
        return {f: _tensors(directory / f) for f in files}

    first = run("--steps", 1)
    assert first["family"] == "wan" and first["steps"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_on"] == "both"
    assert first["lora_files"] == [str(out / f) for f in files]
    assert first["load"] == [
        f"pipe.load_lora_weights({str(out)!r}, adapter_name='high')",
        f"pipe.load_lora_weights({str(out / 'transformer_2')!r}, adapter_name='low', load_into_transformer_2=True)",
    ]
    step1 = lora(out / "checkpoints" / "step_000001")
    assert _same(step1, lora(out))
    resumed = run("--steps", 2, "--resume", "--export", "comfyui")
    assert resumed["steps"] == 2 and resumed["before"] == first["before"]
    comfyui = [str(out / f.replace(".safetensors", "_comfyui.safetensors")) for f in files]
    assert resumed["exports"] == comfyui  # --export comfyui: each expert's final LoRA in ComfyUI's names
    for path in comfyui:
        comfy = load_file(path)
        assert comfy.keys() and all(k.startswith("diffusion_model.blocks.") for k in comfy)
    assert (
        [p for p in resumed["samples"] if p.endswith(".gif")]
        == sorted(str(p.relative_to(out)) for p in (out / "samples").glob("*.gif"))
        != []
    )  # summary.json lists the before/after animations
    step2 = lora(out)
    assert _same(step2, lora(out / "checkpoints" / "step_000002"))
    for f in files:  # the resumed step moved both experts' LoRA on from the checkpoint's
        assert any(not torch.equal(step1[f][k], step2[f][k]) for k in step1[f]), f
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    evals = [x for x in lines if "temporal_consistency" in x]
    assert evals and all(-1 <= x["temporal_consistency"] <= 1 for x in evals)
    assert sorted(p.name for p in (out / "samples").glob("*.gif"))


def _tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a: dict, b: dict) -> bool:
    return (
        a.keys() == b.keys()
        and all(a[f].keys() == b[f].keys() for f in a)
        and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    )


def test_two_processes_train_both_experts_as_one_process_trains_the_doubled_batch(
    pair_model, released_ict, tiny_backbone, tmp_path, launch_two_processes
):
    """Data parallelism over the A14B pair with ``--lora-on both``: ``accelerate launch`` starts two processes (world
    size 2), each expert is its own prepared (DDP) module, and both experts' LoRA after a step whose gradient steps
    span the boundary are the ones a single process trains on the doubled batch (same prompts, same noise)."""
    common = [
        "finetune", "--model", pair_model, "--reward", "ict", "--ict", released_ict, "--backbone", tiny_backbone,
        "--steps", 1, "--k", 2, "--sample-steps", 2, "--resolution", 32, "--num-frames", 5, "--frames", 2,
        "--eval-size", 2, "--lora-rank", 2, "--mixed-precision", "no", "--lr", 1e-3, "--guidance-scale", 1,
        "--max-sequence-length", 8, "--no-gradient-checkpointing", "--lora-on", "both",
    ]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    res = launch_two_processes(*common, "--output", two, "--batch-size", 1)
    assert res.returncode == 0, res.stderr[-3000:]
    run_cli(*common, "--output", one, "--batch-size", 2, check=True)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 1 and len(set(summary["lora_sha256"])) == 1
    for f in ("pytorch_lora_weights.safetensors", "transformer_2/pytorch_lora_weights.safetensors"):
        a, b = load_file(str(two / f)), load_file(str(one / f))
        assert a.keys() == b.keys() and a
        for key in a:  # all-reduced gradients vs one batch mean: float rounding only (Adam's first step ~ lr sign(g))
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
        assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4, f  # this expert trained


@pytest.mark.parametrize("case", ["frames", "resolution", "lora_on", "guidance_2", "frames_spec"])
def test_bad_input_gives_one_clear_line(case, wan_model, tmp_path, capsys):
    base = ["--model", wan_model, "--output", tmp_path / "out", "--resolution", 32, "--sample-steps", 2]
    base += ["--num-frames", 5]
    args, expect = {
        "frames": (["--num-frames", 10], "--num-frames 10: Wan's VAE compresses time 4x, so it takes 4k + 1 frames"),
        "resolution": (["--resolution", 40], "--resolution 40: Wan packs 2x2 patches"),
        "lora_on": (["--lora-on", "low"], "--lora-on low: this Wan model has one transformer"),
        "guidance_2": (["--guidance-scale-2", 2], "--guidance-scale-2 2.0: this Wan model has one transformer"),
        "frames_spec": (["--frames", "none"], "--frames 'none'"),
    }[case]
    rc = main(["finetune", *map(str, base + args)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("rewardtune finetune: error: ") and expect in last and "Traceback" not in err


def test_aliases_name_the_public_models(wan_model, tmp_path, monkeypatch):
    """Each alias names its hub id (offline: a one-line error naming it); a local directory takes WanPipeline's own
    defaults (50 steps, guidance 5, 81 frames, 512 tokens); the A14B alias 40 steps, guidance 4 (3 for the low-noise
    expert); TI2V-5B 121 frames."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = {
        "wan21-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "wan22-ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "wan21-t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "wan22-t2v-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    }
    for alias, hub_id in hub.items():
        assert families.by_name("wan").aliases[alias].hub[0] == hub_id
        with pytest.raises(OfflineError, match=f"'{hub_id}' is not in the local cache"):
            resolve_model(alias)
    pipe = WanPipeline.from_pretrained(wan_model)

    def resolved(**kw):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        resolve_defaults(cfg, pipe, "wan")
        return cfg.sample_steps, cfg.guidance_scale, cfg.num_frames, cfg.max_sequence_length

    assert resolved(model=str(wan_model)) == (50, 5.0, 81, 512)
    assert resolved(model="wan22-t2v-a14b") == (40, 4.0, 81, 512)
    cfg = FinetuneConfig(output=str(tmp_path), model="wan22-t2v-a14b")
    resolve_defaults(cfg, pipe, "wan")
    assert cfg.guidance_scale_2 == 3.0  # the model card's low-noise guidance (4.0 high, 3.0 low)
    assert resolved(model="wan22-ti2v-5b") == (50, 5.0, 121, 512)
    assert resolved(model="wan21-t2v-1.3b", num_frames=33) == (50, 5.0, 33, 512)


def test_the_fsdp_recipe_names_the_block_class_the_transformer_has():
    """accelerate refuses a listed block class the model lacks: the recipe lists the family's FSDP block class, which
    every block of the transformer is."""
    config = yaml.safe_load((ROOT / "recipes/accelerate/fsdp_wan.yaml").read_text())["fsdp_config"]
    listed = set(config["fsdp_transformer_layer_cls_to_wrap"].split(","))
    transformer = tiny_wan_transformer(0)
    assert config["fsdp_version"] == 2 and listed == set(families.by_name("wan").fsdp_blocks)
    assert {type(m).__name__ for m in transformer.blocks} == listed


def test_video_options_are_refused_for_an_image_model(tmp_path):
    """--num-frames, --lora-on and --frame-weights belong to Wan (the families that declare them): on an image family
    they are a one-line error naming who takes them, checked before any weights load."""
    for kw, flag in ((dict(num_frames=9), "--num-frames"), (dict(lora_on="low"), "--lora-on")):
        cfg = FinetuneConfig(output=str(tmp_path), **kw)
        with pytest.raises(UserError, match=f"{flag} applies to Wan models; SD 1.x/2.x takes none"):
            check_family_options(cfg, "sd")
    check_family_options(FinetuneConfig(output=str(tmp_path), num_frames=9, lora_on="low"), "wan")


# The shipped full-size architectures (plan/configs, from diffusers' scripts/convert_wan_to_diffusers.py and Wan's
# umt5_xxl()): exact parameter counts of the meta-built transformers. The published sizes are the model names
# (Wan2.1 T2V 1.3B and 14B, Wan2.2 TI2V 5B, A14B: two 14B experts); 1,418,996,800 x 2 bytes is the 2.84 GB of the
# 1.3B's bf16 weights, and UMT5-XXL's 5.68e9 x 2 bytes the 11.4 GB of Wan's models_t5_umt5-xxl-enc-bf16.pth.
WAN_SIZES = {
    "wan21-t2v-1.3b": 1_418_996_800,
    "wan21-t2v-14b": 14_288_491_584,
    "wan22-ti2v-5b": 4_999_787_712,
    "wan22-t2v-a14b": 14_288_491_584,
}


PLAN_REWARD = tiny_clip_config(
    49408, hidden=32, layers=2, heads=4, projection_dim=1024, image_size=224, patch_size=32
).to_dict()  # the planner's ViT-H-14 reward at a tiny size


def test_the_planner_traces_the_pair_with_the_experts_of_the_gradient_steps(pair_model):
    """``rewardtune plan`` on the tiny A14B-like pair (the Euler scheduler: 2 steps are t = 1000, high noise, and
    t = 8.9, low noise; one frame, which is what the trace's time goes to): with --lora-on low (K=1) and by default
    with K=2 (both) the trace runs the experts the run's gradient steps run (before, the planner's fake timesteps
    had no value to pick one by); both experts' weights are resident in each, both LoRAs (and their optimizer states)
    only with both. (That the reduced trace, a block per expert and then one more, gives the full-depth numbers of
    the pair was checked by hand at 4 blocks per expert; a test of it costs 30 s.)"""
    pipe = WanPipeline.from_pretrained(pair_model)
    experts_mib = sum(p.numel() * 2 for m in (pipe.transformer, pipe.transformer_2) for p in m.parameters()) / 2**20
    lora_params = sum(4 * (m.in_features + m.out_features) for n, m in pipe.transformer.named_modules()
                      if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in WAN_TARGETS))  # fmt: skip

    def plan(**kw):
        cfg = FinetuneConfig(
            model=str(pair_model), output="unused", sample_steps=2, resolution=32, num_frames=1, frames="1",
            mixed_precision="bf16", max_sequence_length=8, lora_rank=4, **kw,
        )  # fmt: skip
        return predict_peak_memory(cfg, reward_config=PLAN_REWARD, cache=False)

    low, both = plan(k=1, lora_on="low"), plan(k=2)
    assert low["trainable_params"] == lora_params and both["trainable_params"] == 2 * lora_params
    assert low["weights_mib"] > experts_mib  # both experts on the accelerator either way
    # the second LoRA: its fp32 weights and AdamW's two states, 12 bytes a parameter (allocator-rounded)
    assert both["resident_mib"] - low["resident_mib"] >= 12 * lora_params / 2**20
    assert both["peak_mib"] > low["peak_mib"]


def test_the_planner_quantizes_both_experts_of_the_pair_as_the_loader_does():
    """--quantize-base nf4 on Wan2.2-T2V-A14B: the loader quantizes both experts (the frozen one is as large as the
    trained one), and so does the planner: the full-size pair's resident weights fall by exactly the two experts'
    Linear weights at 2 - 0.5625 bytes each (bitsandbytes NF4, blocksize 64, fp32 absmax), all but the time
    embedder's, which Wan keeps in fp32; before, it counted the trained expert's alone, time embedder included. (A tiny frame at 64x64: each trace is a few seconds.)"""

    def plan(quantize):
        cfg = FinetuneConfig(
            model="wan22-t2v-a14b", output="unused", k=1, sample_steps=2, resolution="64x64", num_frames=1,
            frames="1", mixed_precision="bf16", lora_on="low", quantize_base=quantize, max_sequence_length=16,
        )  # fmt: skip
        return predict_peak_memory(cfg, reward_config=PLAN_REWARD, cache=False)

    pipe = build_pipeline("wan22-t2v-a14b", torch.bfloat16, "meta")
    per_expert = [  # every Linear but the time embedder's two, which diffusers' quantizer keeps in fp32
        sum(
            m.weight.numel()
            for n, m in expert.named_modules()
            if type(m) is torch.nn.Linear and "time_embedder" not in n
        )
        for expert in (pipe.transformer, pipe.transformer_2)
    ]
    assert per_expert[0] == per_expert[1] > 14e9  # nearly all of each expert's 14.3B weights are Linear
    bf16, nf4 = plan("none"), plan("nf4")
    assert bf16["weights_mib"] - nf4["weights_mib"] == pytest.approx(sum(per_expert) * 1.4375 / 2**20, rel=1e-4)
    assert nf4["quantize_base"] == "nf4" and nf4["peak_mib"] < bf16["peak_mib"] - 36 * 1024


def test_shipped_wan_architectures_build_the_published_models():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    for arch, n in WAN_SIZES.items():
        pipe = build_pipeline(arch, torch.bfloat16, "meta")
        assert type(pipe) is WanPipeline and count(pipe.transformer) == n, arch
        assert count(pipe.text_encoder) == 5_680_910_336 and pipe.text_encoder.config.vocab_size == 256384
        if arch == "wan22-ti2v-5b":  # VAE 2.2: 48 channels, 16x spatial (2x2 patches in the VAE), per-token timesteps
            assert pipe.vae.config.z_dim == 48 and pipe.vae_scale_factor_spatial == 16 and pipe.config.expand_timesteps
            assert pipe.scheduler.config.flow_shift == 5.0
        else:
            assert pipe.vae.config.z_dim == 16 and pipe.vae_scale_factor_spatial == 8
            assert pipe.scheduler.config.flow_shift == 3.0 and not pipe.config.expand_timesteps
        paired = arch == "wan22-t2v-a14b"
        assert (pipe.transformer_2 is not None) == paired and pipe.config.boundary_ratio == (0.875 if paired else None)
        if paired:
            assert count(pipe.transformer_2) == n


def test_the_plan_keeps_a_videos_decode_checkpoints_in_host_memory(wan_model, wan_cfg, tmp_path):
    """On an accelerator what the per-frame decode checkpoints hold waits in host memory (``HostOffload``): the plan
    for a GPU counts it there (``host_mib``), as many bytes as a real decode of those latents copies to the host;
    a plan for the CPU has no host beside it."""
    from rewardtune.plan import predict_peak_memory  # noqa: PLC0415
    from rewardtune.testing import tiny_clip_config  # noqa: PLC0415

    reward = tiny_clip_config(49408, hidden=32, layers=2, heads=4, projection_dim=64, image_size=32).to_dict()
    cfg = wan_cfg(wan_model, tmp_path, num_frames=9, frames="all", k=1, batch_size=1, gradient_checkpointing=True)
    gpu = predict_peak_memory(cfg, reward_config=reward, cache=False)
    vae = WanPipeline.from_pretrained(wan_model).vae
    checkpoint_vae_decoder(vae)
    host = _Recording()
    decode_frames(vae, torch.randn(1, 16, 3, 4, 4, requires_grad=True), None, 4, checkpointed=True, host=host)
    assert host.bytes > 0 and gpu["host_mib"] * 2**20 == host.bytes
    assert "host_mib" not in predict_peak_memory(cfg, reward_config=reward, cache=False, target="cpu")


def test_a_run_whose_decode_checkpoints_cannot_fit_the_host_is_refused_before_training(
    wan_model, wan_cfg, tmp_path, monkeypatch
):
    """``host_bytes`` (a meta copy of the VAE decoding meta latents) is what a real decode keeps on the host; on an
    accelerator a video run whose figure is beyond the host's available memory is one line naming the numbers and
    what to lower (``--force`` runs it), and a CPU run (host and device one) or a run without checkpointing is not
    checked."""
    vae = WanPipeline.from_pretrained(wan_model).vae
    real = _Recording()
    decode_frames(vae, torch.randn(2, 16, 3, 4, 4, requires_grad=True), None, 4, checkpointed=True, host=real)
    assert host_bytes(vae, (2, 16, 3, 4, 4)) == real.bytes > 0
    adapter = make_adapter(WanPipeline.from_pretrained(wan_model), "wan", wan_cfg(wan_model, tmp_path, num_frames=9))
    monkeypatch.setattr(video_mod, "available_bytes", lambda device: (real.bytes // 4, "available on this host"))
    gpu = torch.device("cuda")
    cfg = wan_cfg(wan_model, tmp_path, num_frames=9, frames="all", gradient_checkpointing=True)
    with pytest.raises(UserError, match=r"--num-frames 9 at 32 with --batch-size 2: the video decode's per-frame"):
        check_host_room(adapter, cfg, gpu, 32)
    for ok, device in ((dict(force=True), gpu), ({}, torch.device("cpu")), (dict(gradient_checkpointing=False), gpu)):
        check_host_room(adapter, dataclasses.replace(cfg, **ok), device, 32)  # not refused
