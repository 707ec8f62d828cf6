"""Shared fixtures: tiny real CLIP models and SD/SDXL pipelines saved the way users' files look, the small pieces
the fine-tuning tests share (a reward any generator can move, a tiny run config), and the capture of what the
model libraries log. Nothing downloads: the hub is off and its cache is a fresh empty directory for the session."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# Hermetic hub, before anything imports huggingface_hub (it reads these once, at import): offline whatever the
# developer's shell says, and a cache no developer's download lives in. Variables that would point the caches
# elsewhere are dropped.
_HF_HOME = tempfile.mkdtemp(prefix="rewardtune-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
for _var in (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "PYTORCH_TRANSFORMERS_CACHE",
    "PYTORCH_PRETRAINED_BERT_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "DIFFUSERS_CACHE",
):
    os.environ.pop(_var, None)
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
# `rewardtune plan` keeps its answers in a cache: the session's own, never the developer's
os.environ["REWARDTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="rewardtune-tests-cache-")
atexit.register(shutil.rmtree, os.environ["REWARDTUNE_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (the README's test command runs two workers on the two cores) each worker computes with one
# torch thread, set before torch loads: two a worker would put four threads that spin on two cores (issue #26).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPModel

from rewardtune.finetune import FinetuneConfig  # noqa: E402
from rewardtune.finetune.sampler import SampleState
from rewardtune.testing import perturbed_state_dict, save_tiny_clip, save_tiny_pipeline
from rewardtune.testing.cli import HANG_SECONDS, offline_env

# one thread a worker under xdist (see above: setting 2 here undid it, and a 2-thread conv3d on a busy core ran 12x
# slower than 1 thread); a serial run takes the two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The session's empty hub cache (``HF_HOME``)."""
    return Path(_HF_HOME)


class LibraryLog:
    """What diffusers, peft and transformers logged at WARNING or above, and the Python warnings, while captured."""

    LOGGERS = ("diffusers", "peft", "transformers")

    def __init__(self):
        self.messages: list[str] = []

    def key_problems(self) -> list[str]:
        """Messages about weights that found no module or modules that got no weights."""
        return [m for m in self.messages if "unexpected keys" in m.lower() or "missing keys" in m.lower()]


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def library_log():
    """``with library_log() as log: ...`` captures the model libraries' warnings into ``log`` (a ``LibraryLog``).

    The handler sits on the libraries' own loggers: diffusers' logger does not propagate to the root logger, where
    ``caplog`` listens (pytest 9 also attaches it to non-propagating loggers, but only to those that exist when the
    test phase starts; older pytest not at all). Loggers set quieter than WARNING are opened for the capture."""

    @contextlib.contextmanager
    def capture():
        log = LibraryLog()
        handler = _Collect(log.messages)
        loggers = [logging.getLogger(name) for name in LibraryLog.LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(handler)
            if lg.getEffectiveLevel() > logging.WARNING:
                lg.setLevel(logging.WARNING)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield log
            log.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.removeHandler(handler)
                lg.setLevel(level)

    return capture


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """An HF CLIP directory (config, weights, the real CLIP tokenizer, preprocessor), projection dim 1024."""

    d = tmp_path_factory.mktemp("backbone")
    save_tiny_clip(d, seed=0, projection_dim=1024)
    return d


@pytest.fixture(scope="session")
def released_ict(tiny_backbone, tmp_path_factory) -> Path:
    """ICT as released: <dir>/pytorch_model.bin, a CLIPModel state dict laid over the backbone."""

    d = tmp_path_factory.mktemp("ict")
    base = CLIPModel.from_pretrained(tiny_backbone)
    torch.save(perturbed_state_dict(base, seed=1), d / "pytorch_model.bin")
    return d


# The released HP scorer's parameters (hp_scorer/mlp_pytorch_model.bin): an nn.Sequential named ``layers`` of
# Linear 1024→1024, Dropout, →128, Dropout, →64, Dropout, →16, →1, so the Linear layers are layers.0/2/4/6/7.
RELEASED_HP_LINEARS = {0: (1024, 1024), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}


@pytest.fixture(scope="session")
def released_hp(tiny_backbone, tmp_path_factory) -> Path:
    """HP as released: hp_backbone/pytorch_model.bin and hp_scorer/mlp_pytorch_model.bin, the scorer written by its
    released key names (not through rewardtune's HPHead). Its weights are larger than an initialisation's, so the
    scores of different images spread far beyond the parity tests' tolerances."""

    d = tmp_path_factory.mktemp("hp")
    (d / "hp_backbone").mkdir()
    (d / "hp_scorer").mkdir()
    base = CLIPModel.from_pretrained(tiny_backbone)
    torch.save(perturbed_state_dict(base, seed=2), d / "hp_backbone" / "pytorch_model.bin")
    g = torch.Generator().manual_seed(3)
    scorer = {}
    for i, (out, inp) in RELEASED_HP_LINEARS.items():
        scorer[f"layers.{i}.weight"] = torch.randn(out, inp, generator=g) * 0.1
        scorer[f"layers.{i}.bias"] = torch.randn(out, generator=g) * 0.1
    torch.save(scorer, d / "hp_scorer" / "mlp_pytorch_model.bin")
    return d


def _noise_png(path: Path, h: int, w: int, channel: int, rng) -> Path:
    """Random pixels with one channel saturated in the top half: the hardest case for resampling."""

    arr = (rng.random((h, w, 3)) * 255).astype("uint8")
    arr[: h // 2, :, channel] = 255
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> list[Path]:
    """Three 224x224 PNGs (so CLIP's resize is the identity) and one 300x200 PNG."""

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    return [
        _noise_png(d / f"img{i}.png", h, w, i % 3, rng) for i, (h, w) in enumerate([(224, 224)] * 3 + [(200, 300)])
    ]


@pytest.fixture(scope="session")
def large_image(tmp_path_factory) -> Path:
    """A 512x512 PNG: downscaled by CLIP's preprocessing, as SD 1.x's images are."""

    return _noise_png(tmp_path_factory.mktemp("images") / "img512.png", 512, 512, 1, np.random.default_rng(4))


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory) -> Path:
    """A tiny SD 1.x pipeline directory (diffusers format, the real CLIP tokenizer)."""

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline directory (two text encoders, text_time conditioning)."""

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl", seed=0)


class Brightness(torch.nn.Module):
    """Mean pixel value (times ``sign``): a reward any generator can move."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def forward(self, images, prompts):
        return self.sign * images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="session")
def tiny_demo_flags() -> list[str]:
    """``rewardtune demo`` flags that run the bundled demo in seconds: 2 steps of batch 2, 4 held-out prompts,
    evaluated after each step, one thread (two threads on cores other jobs share spin: under load 9 a 2-step
    demo passed 300 s)."""
    return [
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--eval-size",
        "4",
        "--batch-size",
        "2",
        "--train-prompts",
        "8",
        "--threads",
        "1",
    ]


@pytest.fixture(scope="session")
def brightness():
    """``brightness(sign=1.0)``: a differentiable reward, the mean pixel value times ``sign``."""
    return Brightness


@pytest.fixture(scope="session")
def tiny_cfg():
    """``tiny_cfg(model, output, **overrides)``: a FinetuneConfig that trains a tiny pipeline in seconds."""

    def make(model, output, **kw) -> FinetuneConfig:
        base = dict(
            model=str(model),
            prompts="builtin:simple",
            output=str(output),
            method="draft-k",
            k=2,
            steps=2,
            batch_size=2,
            lr=3e-2,
            lora_rank=4,
            lora_alpha=4.0,
            resolution=32,
            sample_steps=3,
            guidance_scale=3.0,
            eval_every=0,
            eval_size=4,
            checkpoint_every=0,
            gradient_checkpointing=False,
        )  # checkpointing: see the tests that turn it on
        base.update(kw)
        return FinetuneConfig(**base)

    return make


@pytest.fixture(scope="session")
def flow_cfg(tiny_cfg):
    """``tiny_cfg`` for a flow model: the model's own guidance, two evaluation prompts, short prompts for the large
    text encoder (16 tokens)."""
    return lambda model, output, **kw: tiny_cfg(
        model, output, **{"guidance_scale": None, "eval_size": 2, "max_sequence_length": 16, **kw}
    )


@pytest.fixture(scope="session")
def stock_pipeline():
    """``stock_pipeline(directory)``: the diffusers pipeline a user loads from a saved directory, progress bars off."""

    def load(path):
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


class Recorder(torch.nn.Module):
    """Wraps a denoiser (a UNet or a transformer, however it is called) and keeps each call's output, so a
    test can read the reward's gradient with respect to it; the backward pass's recomputation of
    checkpointed calls is not recorded."""

    def __init__(self, model):
        super().__init__()
        self.model, self.outputs, self.recording = model, [], True

    def forward(self, *args, **kw):
        out = self.model(*args, **kw)
        first = out[0]
        if isinstance(first, list):  # one tensor per sample (Z-Image): recorded stacked, handed on as a list again
            first = torch.stack(first)
            out = (list(first.unbind(0)), *out[1:])
        if self.recording:
            if first.requires_grad:
                first.retain_grad()
            self.outputs.append(first)
        return out


def _run_plan(trainer, plan, model):
    """The first batch of ``trainer`` (step 0's prompts and noise) sampled with ``plan`` through ``model`` (the
    denoiser or a wrapper of it): the no-gradient prefix, then the gradient steps; returns ``run_grad``'s
    (latents, regulariser, prompts)."""
    prompts = trainer.batch_prompts(0, step=0)
    gen = trainer.batch_noise(0, step=0)
    latents = trainer.sampler.initial_latents((len(prompts), *trainer.latent_shape), gen, trainer.device)
    state = SampleState(latents, trainer.encode(prompts), plan, 0, gen, prompts)
    trainer.sampler.run_prefix(model, state)
    return trainer.sampler.run_grad(model, state)


@pytest.fixture(scope="session")
def run_plan():
    """``run_plan(trainer, plan, model)``: see ``_run_plan``."""
    return _run_plan


@pytest.fixture(scope="session")
def grads_per_step():
    """``grads_per_step(trainer, plan)``: per denoising step of one batch sampled with ``plan``, the size of
    d(reward)/d(denoiser output) for each sample (guidance rows summed), or None where no gradient reached it."""

    def measure(trainer, plan):
        rec = Recorder(trainer.unet)
        prompts = trainer.batch_prompts(0, step=0)
        out, _, _ = _run_plan(trainer, plan, rec)
        rec.recording = False
        trainer.score(trainer.decode(out), prompts).sum().backward()
        grads = []
        for y in rec.outputs:
            if y.grad is None:
                grads.append(None)
                continue
            g = y.grad.abs().flatten(1).sum(dim=1)
            if len(g) == 2 * len(prompts):  # classifier-free guidance rows
                g = g[: len(prompts)] + g[len(prompts) :]
            grads.append(g.tolist())
        return grads

    return measure


@pytest.fixture(scope="session")
def batch_reward():
    """``batch_reward(trainer, step)``: (mean reward, number of images) of the batch ``trainer`` trains on at
    ``step`` (its prompts and noise), sampled without gradients — what one optimizer step should raise."""

    def measure(trainer, step):
        with torch.no_grad():
            state = trainer.sample_prefix(trainer.batch_prompts(0, step=step), trainer.batch_noise(0, step=step))
            latents, _, prompts = trainer.grad_steps(state)
            return float(trainer.score(trainer.decode(latents), prompts).mean()), len(prompts)

    return measure


@pytest.fixture(scope="session")
def step_raises_reward(batch_reward):
    """``step_raises_reward(trainer, method)``: one optimizer step of ``method`` logs the reward its batch had and
    raises that batch's reward, with Adam's momentum from another test's batch cleared first (it would outweigh
    this gradient); returns the number of images the step scored (DRaFT-LV adds its re-noised copies)."""

    def check(trainer, method):
        trainer.cfg.method = method
        step = trainer.global_step
        before, n = batch_reward(trainer, step)
        trainer.optimizer.state.clear()
        metrics = trainer.step()
        after, _ = batch_reward(trainer, step)
        assert metrics["reward"] == pytest.approx(before, abs=1e-5) and metrics["grad_norm"] > 0
        assert after > before
        return n

    return check


@pytest.fixture(scope="session")
def launch_two_processes():
    """``launch_two_processes(*args, timeout=HANG_SECONDS)``: see ``_launch_two_processes``."""
    return _launch_two_processes


def _launch_two_processes(*args, timeout: float = HANG_SECONDS) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m rewardtune.cli ARGS`` on CPUs (torchrun processes
    with gloo; accelerate's --cpu alone starts one process), on a free port, one thread each, offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "rewardtune.cli",
        *[str(a) for a in args],
    ]
    env = offline_env(ACCELERATE_USE_CPU="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
