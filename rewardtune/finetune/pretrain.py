"""The pre-training denoising loss on real image–caption pairs (``--pretrain-data``): ImageReward's regulariser
for ReFL (Xu et al., NeurIPS 2023), which keeps the fine-tuned model a good denoiser of real images while the
reward pulls it elsewhere. The loss is the one SD was trained with, as diffusers' ``train_text_to_image.py``
writes it: the VAE-encoded image noised to a random training timestep, and the mean squared error of the
denoiser's prediction (with the LoRA on) against the noise (or the v / sample target of its prediction type).

Layout of a data directory, either:

- image files (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``), each with a same-named ``.txt`` caption
  (``cat.png`` + ``cat.txt``; the kohya-ss layout), or
- a ``metadata.jsonl`` with one ``{"file_name": "cat.png", "text": "a cat"}`` a line (the Hugging Face
  ``imagefolder`` layout diffusers' examples read); file names relative to the directory.

Images are resized (bicubic) to cover the training size and centre-cropped to it (a square, or HxW).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..images import open_image
from ..sizes import hw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def load_pairs(directory: str | Path, flag: str = "--pretrain-data") -> list[tuple[Path, str]]:
    """The (image path, caption) pairs of a data directory (see the module docstring), sorted by file name."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} '{directory}' is not a directory; give a folder of images with .txt captions")
    meta = root / METADATA
    if meta.is_file():
        pairs = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").split("\n"), 1):  # JSON Lines: \n ends a line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((root / row["file_name"], str(row["text"])))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{flag}: '{meta}' line {n} is not a JSON object with file_name and text") from None
        missing = [str(p) for p, _ in pairs if not p.is_file()]
        if missing:
            raise UserError(f"{flag}: '{meta}' names {len(missing)} missing image(s), e.g. '{missing[0]}'")
    else:
        images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise UserError(
                f"{flag}: {len(uncaptioned)} image(s) in '{root}' have no same-named .txt caption, "
                f"e.g. '{uncaptioned[0]}'; add one or remove the image"
            )
        pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
    if not pairs:
        raise UserError(
            f"{flag} '{root}' holds no image with a caption: put NAME.png beside NAME.txt, "
            f"or write a {METADATA} of file_name/text lines"
        )
    return pairs


def load_images(paths: list[Path], resolution) -> torch.Tensor:
    """Images (B,3,H,W) in [-1, 1] for ``resolution`` (a side, or ``HxW``): resized (bicubic) to cover H x W,
    then centre-cropped."""
    out = []
    rh, rw = hw(resolution)
    for path in paths:
        with Image.fromarray(open_image(path)) as im:
            scale = max(rh / im.height, rw / im.width)
            w, h = max(rw, round(im.width * scale)), max(rh, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - rw) // 2, (h - rh) // 2
            im = im.crop((left, top, left + rw, top + rh))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1.0


def denoising_loss(denoiser, cond, scheduler, latents, noise, timesteps, dtype=torch.float32) -> torch.Tensor:
    """SD's training loss: MSE between the denoiser's prediction on ``latents`` noised to ``timesteps`` (B,) by
    ``scheduler.add_noise`` and its target (the noise, v, or the clean latents, per the prediction type)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = cond.call(denoiser, noisy.to(dtype), timesteps).float()
    return F.mse_loss(pred, target.float())


def vae_encode(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latents the denoiser works on: a sample of the VAE posterior, shifted and scaled
    (the inverse of ``UNetAdapter.vae_latents``), without gradients."""
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor
