"""One differentiable DDIM sampler with truncated backpropagation; the methods are settings of it.

A ``Plan`` says, per sample, from which denoising step gradients flow (``grad_from``; the latent is
detached before it), where sampling stops (``stop``), whether the last step's x0 prediction is the
output (ReFL), and how many re-noised copies of the final step to add (DRaFT-LV):

- DRaFT-K: grad_from = N-K for all samples, full N steps.
- DRaFT-LV: K = 1, plus ``lv`` samples re-noised from the result and denoised again by the last step.
- ReFL: stop at a random step s in the configured range; one step with gradients predicts x0.
- AlignProp: grad_from = N-K with K drawn uniformly in k_min..k, once per batch (AlignProp's 2024 code), or
  for each sample j its own K_j (``per_sample``).

The step arithmetic is diffusers' ``DDIMScheduler.step`` (it honours the prediction type:
epsilon, v_prediction or sample); it is plain tensor math, so gradients pass through it. Flow-matching
families (SD3, FLUX) use ``flow.FlowMatchSampler``, the same loop with Euler steps (``step``, ``renoise``).

A sampler is what the Trainer steps: ``guided``, ``initial_latents``, ``run_prefix``, ``run_grad`` and
``sample``. It calls the denoiser only through the conditioning's ``call(model, x, t)``, so it does not
know the family; ``make_sampler`` picks the sampler a family's adapter names.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from .adapters import Conditioning
from .host_heap import release_freed_heap


@dataclass
class Plan:
    """Which steps carry gradients, per sample (see the module docstring)."""

    grad_from: list[int]
    stop: int
    x0_at_stop: bool = False
    lv: int = 0

    @property
    def first_grad_step(self) -> int:
        return min(min(self.grad_from), self.stop - 1)

    def rows(self, start: int, n: int) -> Plan:
        """This process's rows ``start:start + n`` of a plan drawn for the global batch."""
        return Plan(self.grad_from[start : start + n], self.stop, self.x0_at_stop, self.lv)


class BatchNoise:
    """The randomness of one global batch as one process sees it: the one noise rule.

    Every draw is made for the whole global batch (``total`` rows; default: the rows asked for) from one
    generator, in the order the diffusers pipeline draws (the initial latents, then each step's eta noise, then
    DRaFT-LV's re-noising), and this process keeps rows ``start:start + rows``. So N processes see exactly the noise
    one process with the N-fold batch sees, and since the loops draw before any (checkpointed) model call, a
    recomputed call replays the forward pass's noise. The truncation plan draws from a second generator (``plan``),
    so a random plan (ReFL, AlignProp) does not shift the pipeline's order of draws."""

    def __init__(
        self,
        generator: torch.Generator | None,
        total: int | None = None,
        start: int = 0,
        plan: torch.Generator | None = None,
    ):
        self.generator, self.total, self.start = generator, total, start
        if plan is None and generator is not None:  # a plan stream of its own, derived from the generator's seed
            digest = hashlib.sha256(f"plan:{generator.initial_seed()}".encode()).digest()
            plan = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        self.plan = plan

    @classmethod
    def of(cls, noise: BatchNoise | torch.Generator | None) -> BatchNoise:
        """``noise`` itself, or a plain generator (or None: torch's global one) as the noise of a one-process batch."""
        return noise if isinstance(noise, BatchNoise) else cls(noise)

    def draw(self, shape: tuple, fn=None) -> torch.Tensor:
        """This process's rows of one fp32 draw of ``(total, *shape[1:])``: ``randn`` or ``fn(shape, generator)``."""
        full = (self.total or shape[0], *shape[1:])
        x = fn(full, self.generator) if fn else torch.randn(full, generator=self.generator, dtype=torch.float32)
        return x[self.start : self.start + shape[0]]


def make_plan(
    method: str,
    n_steps: int,
    batch: int,
    generator: torch.Generator,
    k: int = 1,
    lv: int = 0,
    refl_range: tuple[float, float] = (0.7, 1.0),
    k_min: int = 1,
    per_sample: bool = False,
) -> Plan:
    """The truncation plan of one batch for ``method``; random draws come from ``generator``. AlignProp draws
    K in ``k_min``..``k`` (inclusive), once for the batch or, with ``per_sample``, for each sample."""

    def randint(lo: int, hi: int, n: int = 1) -> list[int]:  # inclusive bounds
        return torch.randint(lo, hi + 1, (n,), generator=generator).tolist()

    if method == "draft-k":
        return Plan([n_steps - k] * batch, n_steps)
    if method == "draft-lv":
        return Plan([n_steps - 1] * batch, n_steps, lv=lv)
    if method == "refl":
        lo = min(n_steps - 1, int(refl_range[0] * n_steps))
        hi = min(n_steps - 1, max(lo, math.ceil(refl_range[1] * n_steps) - 1))
        s = randint(lo, hi)[0]
        return Plan([s] * batch, s + 1, x0_at_stop=True)
    if method == "alignprop":
        draws = randint(k_min, k, batch) if per_sample else randint(k_min, k) * batch
        return Plan([n_steps - kj for kj in draws], n_steps)
    raise ValueError(f"unknown method {method!r}")


@dataclass
class SampleState:
    """The sampler's state between the no-grad prefix and the gradient steps."""

    latents: torch.Tensor
    cond: Conditioning
    plan: Plan
    step: int
    noise: BatchNoise
    prompts: list[str] = field(default_factory=list)


class TruncatedSampler:
    """DDIM with classifier-free guidance over a denoiser called as ``cond.call(model, x, t)``."""

    def __init__(
        self,
        scheduler,
        n_steps: int,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        dtype: torch.dtype = torch.float32,
        checkpoint_calls: bool = False,
    ):
        """``dtype``: the UNet's weights; latents and step arithmetic stay fp32, the UNet gets its own type.
        ``checkpoint_calls``: keep only each gradient call's inputs and recompute the call in the backward pass."""
        self.scheduler = scheduler
        self.dtype = dtype
        self.n_steps = n_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.checkpoint_calls = checkpoint_calls
        scheduler.set_timesteps(n_steps)
        self.timesteps = scheduler.timesteps.clone()

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def predict(self, unet, x: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        """The guided model output at step ``i`` (fp32, whatever the UNet's precision)."""
        t = self.timesteps[i].to(x.device)
        inp = torch.cat([x, x]) if cond.guided else x
        inp = self.scheduler.scale_model_input(inp, t).to(self.dtype)
        out = cond.call(unet, inp, t).float()
        if not cond.guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def step_noise(self, x: torch.Tensor, noise: BatchNoise) -> torch.Tensor | None:
        """The fresh noise of one step (DDIM with eta > 0), or None. Drawn by the loops below before the model
        call and outside any checkpointed code, so a recomputed call replays exactly the same noise."""
        if self.eta <= 0:
            return None
        return noise.draw(x.shape).to(x.device)

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(x_{i+1}, x0 prediction): the step every loop below takes (a subclass swaps the arithmetic)."""
        t = self.timesteps[i].to(x.device)
        res = self.scheduler.step(out, t, x, eta=self.eta, variance_noise=noise)
        return res.prev_sample, res.pred_original_sample

    def renoise(self, final: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """``final`` noised back to step ``i``'s noise level (DRaFT-LV)."""
        return self.scheduler.add_noise(final, noise, self.timesteps[i].view(1))

    def initial_latents(self, shape: tuple, noise: BatchNoise | torch.Generator | None, device) -> torch.Tensor:
        """The initial noise of a batch of ``shape``, drawn as the pipeline draws it (see ``BatchNoise``)."""
        return (BatchNoise.of(noise).draw(shape) * self.scheduler.init_noise_sigma).to(device)

    @torch.no_grad()
    def run_prefix(self, unet, state: SampleState) -> SampleState:
        """Denoise without gradients up to the first step that carries any."""
        x = state.latents
        for i in range(state.step, state.plan.first_grad_step):
            noise = self.step_noise(x, state.noise)
            x, _ = self.step(self.predict(unet, x, i, state.cond), i, x, noise)
        state.latents, state.step = x, state.plan.first_grad_step
        return state

    def run_grad(self, unet, state: SampleState, base_unet=None):
        """The steps with gradients: returns (latents, regulariser, prompts), with the DRaFT-LV copies
        appended to the batch. ``base_unet`` (adapters off) enables the regulariser.

        With ``checkpoint_calls`` every gradient call but the last keeps only its inputs (latent, noise, the base
        model's prediction) and is recomputed in the backward pass: memory stays flat in the number of steps."""
        plan, x = state.plan, state.latents.detach()
        grad_from = torch.tensor(plan.grad_from, device=x.device).view(-1, *[1] * (x.dim() - 1))
        calls = plan.stop - state.step + plan.lv
        regs, out = [], x
        for n, i in enumerate(range(state.step, plan.stop)):
            x = torch.where(grad_from >= i, x.detach(), x)  # cut each sample's graph at its truncation point
            x_next, x0, reg = self._grad_call(unet, x, i, state, base_unet, checkpointed=n < calls - 1)
            regs.append(reg)
            out = x0 if (plan.x0_at_stop and i == plan.stop - 1) else x_next
            x = x_next
        latents, prompts = [out], list(state.prompts)
        i = self.n_steps - 1
        for n in range(plan.lv):  # DRaFT-LV: the detached result noised back to the last step, denoised again
            noise = state.noise.draw(out.shape).to(out.device)
            renoised = self.renoise(out.detach(), noise, i)
            x_next, _, reg = self._grad_call(unet, renoised, i, state, base_unet, checkpointed=n < plan.lv - 1)
            latents.append(x_next)
            regs.append(reg)
            prompts += state.prompts
        reg = torch.stack(regs).mean() if base_unet is not None else out.new_zeros(())
        return torch.cat(latents), reg, prompts

    def _grad_call(self, unet, x, i, state: SampleState, base_unet, checkpointed: bool):
        """One denoising step with gradients: (x_{i+1}, x0, regulariser term). Its randomness and the base
        model's prediction (no gradients) are computed first, outside the (maybe) checkpointed call."""
        noise = self.step_noise(x, state.noise)
        base = None
        if base_unet is not None:
            with torch.no_grad():
                base = self.predict(base_unet, x.detach(), i, state.cond)
        if checkpointed and self.checkpoint_calls:
            return checkpoint(self._released_call, unet, x, i, state.cond, noise, base, use_reentrant=False)
        return self._call(unet, x, i, state.cond, noise, base)

    def _released_call(self, unet, x, i, cond, noise, base):
        """A checkpointed call (its forward and its recomputation), after the CPU heap's free pages go back to
        the system: else freed activations stay resident around the small tensors kept per step (host_heap)."""
        release_freed_heap(x.device)
        return self._call(unet, x, i, cond, noise, base)

    def _call(self, unet, x, i, cond, noise, base):
        pred = self.predict(unet, x, i, cond)
        x_next, x0 = self.step(pred, i, x, noise)
        reg = (pred - base).pow(2).mean() if base is not None else pred.new_zeros(())
        return x_next, x0, reg

    @torch.no_grad()
    def sample(
        self,
        unet,
        cond: Conditioning | list[Conditioning],
        latents: torch.Tensor,
        noise: BatchNoise | torch.Generator | None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Plain sampling, all steps without gradients (evaluation). With a list of conditionings, one per ``chunk``
        rows of ``latents``, the model runs chunk by chunk while the noise is drawn for the whole batch at each
        step, as the pipeline draws it for that batch: the same images whatever the chunk size."""
        conds = cond if isinstance(cond, list) else [cond]
        chunk = chunk or len(latents)
        noise, x = BatchNoise.of(noise), latents
        for i in range(self.n_steps):
            step_noise = self.step_noise(x, noise)
            parts = []
            for j, c in enumerate(conds):
                rows = slice(j * chunk, (j + 1) * chunk)
                xs = x[rows]
                parts.append(
                    self.step(self.predict(unet, xs, i, c), i, xs, None if step_noise is None else step_noise[rows])[0]
                )
            x = torch.cat(parts)
        return x


# a TruncatedSampler subclass, imported once the base exists (and its note on small steps, for the Trainer)
from .flow import FlowMatchSampler, small_steps_note  # noqa: E402, F401

SAMPLERS = {"ddim": TruncatedSampler, "flow": FlowMatchSampler}


def make_sampler(kind: str, scheduler, cfg, dtype: torch.dtype = torch.float32, adapter=None, resolution=None):
    """The truncated sampler of ``kind`` (an adapter's ``sampler_kind``) with ``cfg``'s steps, guidance and eta.

    With ``adapter`` and ``resolution`` (pixels, or (height, width)), the adapter's ``sampler_options`` for that
    size are added: FLUX's resolution-dependent shift and packed noise, which guidance its model takes."""
    options = dict(guidance_scale=cfg.guidance_scale, eta=cfg.eta, checkpoint_calls=cfg.checkpoint_calls)
    if adapter is not None and hasattr(adapter, "sampler_options"):
        options.update(adapter.sampler_options(resolution))
    return SAMPLERS[kind](scheduler, cfg.sample_steps, dtype=dtype, **options)
