"""Whole-call checkpointing of the gradient steps (issue #13): the same gradients as keeping every call's
activations, including eta noise (drawn outside the checkpointed call, so the recomputation replays it), the
regulariser's base-model predictions and DRaFT-LV's re-noised copies; and ``--compile`` (the same gradients as
eager mode, or a one-line error where torch.compile cannot compile)."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo

import rewardtune.finetune.compile as compile_mod
import rewardtune.finetune.sampler as sampler_mod
from rewardtune.errors import UserError
from rewardtune.finetune import Trainer
from rewardtune.finetune.compile import check_compile
from rewardtune.finetune.host_heap import release_freed_heap
from rewardtune.testing.cli import offline_env, run_cli


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one micro-step on fixed prompts and noise, from LoRA weights set away from zero
    (at their init the B matrices are zero, which would hide most of the graph)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(trainer.unet.named_parameters()):
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.optimizer.zero_grad(set_to_none=True)
    r, reg, finite = trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
    assert finite
    return (
        {n: p.grad.clone() for n, p in trainer.unet.named_parameters() if p.requires_grad},
        float(r.mean()),
        float(reg),
    )


@pytest.mark.parametrize(
    "method,extra",
    [
        ("draft-k", {"k": 4, "eta": 1.0, "reg_weight": 0.5}),
        ("draft-lv", {"lv_samples": 2, "eta": 1.0}),
        ("alignprop", {"k": 4}),
    ],
)
def test_checkpointed_calls_give_the_same_gradients(sd_model, tmp_path, tiny_cfg, brightness, method, extra):
    results = {}
    for on in (False, True):
        cfg = tiny_cfg(
            sd_model,
            tmp_path / f"out{on}",
            method=method,
            sample_steps=4,
            checkpoint_calls=on,
            gradient_checkpointing=on,
            **extra,
        )
        results[on] = _grads(Trainer(cfg, reward=brightness()))
    (g_off, r_off, reg_off), (g_on, r_on, reg_on) = results[False], results[True]
    assert r_on == pytest.approx(r_off, rel=1e-6) and reg_on == pytest.approx(reg_off, rel=1e-6)
    if "reg_weight" in extra:
        assert reg_off > 0  # the regulariser took part
    assert sum(float(g.abs().sum()) for g in g_off.values()) > 0
    for name, g in g_off.items():
        torch.testing.assert_close(g_on[name], g, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_only_the_last_gradient_call_is_not_checkpointed(sd_model, tmp_path, tiny_cfg, brightness, monkeypatch):
    """K gradient calls: K-1 go through torch's checkpoint, the last one's activations are used at once; off,
    none does. DRaFT-LV: the chain's calls and all re-noised copies but the last."""

    calls = []
    real = sampler_mod.checkpoint

    def counting(fn, *args, **kw):
        calls.append(args[2])  # the step index
        return real(fn, *args, **kw)

    monkeypatch.setattr(sampler_mod, "checkpoint", counting)
    for method, extra, expected in [
        ("draft-k", {"k": 3}, [1, 2]),
        ("draft-lv", {"lv_samples": 2}, [3, 3]),
        ("draft-k", {"k": 1}, []),
    ]:
        calls.clear()
        trainer = Trainer(
            tiny_cfg(sd_model, tmp_path / method / str(extra), method=method, sample_steps=4, **extra),
            reward=brightness(),
        )
        trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
        assert calls == expected, (method, extra, calls)
    calls.clear()
    trainer = Trainer(
        tiny_cfg(sd_model, tmp_path / "off", sample_steps=4, k=4, checkpoint_calls=False), reward=brightness()
    )
    trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
    assert calls == []


def test_the_cpu_heap_is_released_before_each_checkpointed_call_and_its_recomputation(
    sd_model, tmp_path, tiny_cfg, brightness, monkeypatch
):
    released = []
    monkeypatch.setattr(sampler_mod, "release_freed_heap", lambda device: released.append(str(device)))
    for k, expected in [(3, 4), (1, 0)]:  # K=3: two checkpointed calls, each run forward and recomputed
        released.clear()
        trainer = Trainer(tiny_cfg(sd_model, tmp_path / str(k), sample_steps=4, k=k), reward=brightness())
        trainer.micro_step(trainer.batch_prompts(0, step=0), trainer.batch_noise(0, step=0))
        assert released == ["cpu"] * expected, (k, released)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_releasing_the_heap_returns_freed_pages_that_a_kept_block_pins():
    """64 KiB tensors come from glibc's heap; freeing 15 of every 16 leaves their pages resident (the kept ones
    pin the heap), and the release hands them back."""
    if not release_freed_heap("cpu"):
        pytest.skip("the C library has no malloc_trim (not glibc)")
    blocks = [torch.ones(16384) for _ in range(4096)]  # 256 MiB, every page touched
    kept = blocks[::16]
    del blocks
    before = _rss_mib()
    assert release_freed_heap("cpu")
    after = _rss_mib()
    assert before - after > 150, (before, after)
    assert all(float(t[0]) == 1.0 for t in kept)  # the live blocks are intact
    assert not release_freed_heap("meta") and not release_freed_heap(torch.device("cuda", 0))


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get("REWARDTUNE_SLOW_TESTS"),
                reason="inductor compiles this tiny UNet in minutes on 2 CPU cores; REWARDTUNE_SLOW_TESTS=1 runs it",
            ),
        ),
    ],
)
def test_compiled_denoiser_gives_the_eager_gradients(sd_model, tmp_path, tiny_cfg, brightness, backend, monkeypatch):
    """--compile under whole-call and block checkpointing, LoRA and eta noise: K=2, so the first call is recomputed
    through the compiled model in the backward pass. aot_eager traces the same forward and backward graphs as
    inductor (dynamo, AOTAutograd's partition) and runs them with eager kernels; inductor also generates code."""
    if backend == "inductor":
        try:
            check_compile(cuda=torch.cuda.is_available())
        except UserError as exc:
            pytest.skip(f"torch.compile cannot compile on this machine: {exc}")
    monkeypatch.setattr(compile_mod, "BACKEND", backend)
    results = {}
    for on in (False, True):
        torch._dynamo.reset()
        cfg = tiny_cfg(
            sd_model,
            tmp_path / f"out{on}",
            sample_steps=2,
            k=2,
            eta=1.0,
            checkpoint_calls=True,
            gradient_checkpointing=True,
            compile=on,
        )
        trainer = Trainer(cfg, reward=brightness())
        torch._dynamo.utils.counters.clear()
        results[on] = _grads(trainer)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == on, graphs  # compiled graphs ran with --compile, none without
    (g_eager, r_eager, _), (g_comp, r_comp, _) = results[False], results[True]
    assert r_comp == pytest.approx(r_eager, rel=1e-5)
    assert sum(float(g.abs().sum()) for g in g_eager.values()) > 0
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-3, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --compile needs Triton, not a C++ compiler")
def test_compile_without_a_cpp_compiler_is_one_line(sd_model, tmp_path):
    env = offline_env(CXX=str(tmp_path / "no-such-c++"))
    res = run_cli("finetune", "--model", sd_model, "--output", tmp_path, "--compile", "--steps", 1, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--compile on the CPU needs a C++ compiler" in lines[0], res.stderr
    assert "no-such-c++" in lines[0] and "Traceback" not in res.stderr
