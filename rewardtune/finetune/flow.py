"""The flow-matching sampler (SD3/SD3.5, FLUX.1): Euler steps on the scheduler's sigmas, with the same
truncation plans as DDIM (DRaFT-K, DRaFT-LV, ReFL, AlignProp are settings of one loop, ``TruncatedSampler``'s).

Flow matching: x_σ = σ·noise + (1−σ)·x0 and the model predicts the velocity v = noise − x0, so one Euler step
from σ_i to σ_{i+1} is x + (σ_{i+1} − σ_i)·v and the clean-sample estimate is x0 = x − σ_i·v. The sigmas and
timesteps are the ones the diffusers pipeline computes: the scheduler's ``set_timesteps`` is called with the
arguments the pipeline passes (SD3: static shift from the scheduler config; FLUX: sigmas linspace(1, 1/N, N)
and the resolution's ``mu``), but the step itself is written here: the scheduler's ``step()`` keeps an
internal step counter and casts to fp32 and back, neither of which suits a loop that restarts at any step
and backpropagates. The timestep the model sees is the scheduler's (σ·1000); the conditioning converts it
to the unit its transformer expects.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .sampler import BatchNoise, TruncatedSampler

# An Euler step that moves the sample by less than this much of v passes about that fraction of the reward's
# gradient to its model call: SD3's schedules all end with sigma 0.0089 -> 0 (docs/finetune.md, "Small last steps").
SMALL_STEP_DT = 0.02


def small_steps_note(sampler, method: str, k: int | None) -> str | None:
    """One line when every step that carries gradients (DRaFT-K's last K, AlignProp's largest K, DRaFT-LV's last
    step) moves the sample by less than ``SMALL_STEP_DT``: the LoRA would learn from almost no signal."""
    sigmas = getattr(sampler, "sigmas", None)
    if sigmas is None or method not in ("draft-k", "draft-lv", "alignprop"):
        return None
    dt = (sigmas[:-1] - sigmas[1:]).abs().tolist()
    n, k = len(dt), 1 if method == "draft-lv" or not k else k
    if max(dt[n - k :]) >= SMALL_STEP_DT:
        return None
    enough = next((j for j in range(k + 1, n + 1) if max(dt[n - j :]) >= SMALL_STEP_DT), None)
    advice = (
        f"use --k {enough} or more" if enough and method != "draft-lv" else "use --method draft-k with a larger --k"
    )
    return (
        f"note: {method} K={k}: every gradient step of this {n}-step schedule moves the sample by |dt| < "
        f"{SMALL_STEP_DT} (the last: sigma {float(sigmas[-2]):.4f} -> 0), so the LoRA gets almost no gradient; "
        f"{advice} (docs/finetune.md, 'Small last steps')"
    )


class FlowMatchSampler(TruncatedSampler):
    """Euler sampling of a flow-matching model, with true classifier-free guidance ([uncond, cond] rows) when
    ``guidance_scale`` > 1 (SD3). ``schedule(n_steps)``: the extra ``set_timesteps`` arguments (``sigmas``, ``mu``);
    ``noise(shape, generator)``: the initial draw when it is not a plain ``randn(shape)`` (FLUX draws the
    unpacked latent and packs it, as its pipeline does)."""

    def __init__(
        self,
        scheduler,
        n_steps: int,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        dtype: torch.dtype = torch.float32,
        schedule=None,
        noise=None,
        checkpoint_calls: bool = False,
    ):
        if eta > 0:
            raise UserError(
                f"--eta {eta}: flow-matching models are sampled with the deterministic Euler ODE "
                f"sampler; eta has no meaning there, leave it at 0"
            )
        self.scheduler = scheduler
        self.dtype = dtype
        self.n_steps = n_steps
        self.guidance_scale = guidance_scale
        self.eta = 0.0
        self.checkpoint_calls = checkpoint_calls
        self.noise = noise
        scheduler.set_timesteps(n_steps, **(schedule(n_steps) if schedule else {}))
        self.timesteps = scheduler.timesteps.clone()  # σ·1000, fp32
        self.sigmas = scheduler.sigmas.clone()  # n_steps + 1 values, the last 0

    def predict(self, model, x: torch.Tensor, i: int, cond) -> torch.Tensor:
        """The (guided) velocity at step ``i``, fp32 whatever the model's precision."""
        inp = torch.cat([x, x]) if cond.guided else x
        t = self.timesteps[i].to(x.device).expand(inp.shape[0])
        out = cond.call(model, inp.to(self.dtype), t).float()
        if not cond.guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None):
        """(x at σ_{i+1}, x0 estimate): one Euler step of the ODE; no randomness."""
        sigma, sigma_next = self.sigmas[i].to(x.device), self.sigmas[i + 1].to(x.device)
        return x + (sigma_next - sigma) * v, x - sigma * v

    def renoise(self, final: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        sigma = self.sigmas[i].to(final.device)
        return sigma * noise + (1.0 - sigma) * final

    def initial_latents(self, shape: tuple, noise, device) -> torch.Tensor:
        return BatchNoise.of(noise).draw(shape, self.noise).to(device)
