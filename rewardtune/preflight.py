"""Bounds before cost: a run whose images cannot fit in memory is refused before any weights load.

``--resolution 100000`` used to load the model and be killed by the kernel after taking 18 GB of a shared
host's memory. The check here reads only the model's config files: the model's positional limit (SD3's
``pos_embed_max_size``), and a floor under the memory one training micro-batch needs -- the VAE decoder's last
block, which every method runs at full resolution with ``block_out_channels[0]`` channels, holding at least a
layer's input and output and the gradient through them for each image. That floor is far below a real step's peak (``rewardtune plan`` predicts
that), so a run refused here could never have fit; ``--force`` runs it anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .sizes import hw

GIB = 2**30


def decode_floor_bytes(model_dir: Path, resolution: int, batch: int, mixed_precision: str | None) -> int:
    """The least memory a micro-batch of ``batch`` images at ``resolution`` needs in the VAE decoder: three
    full-resolution feature maps of its first block's width per image -- a layer's input and output, and the
    gradient the reward sends back through them -- in 16-bit floats under mixed precision, else 32-bit."""
    vae = _config(model_dir / "vae" / "config.json")
    width = min(vae.get("block_out_channels") or [128])
    h, w = hw(resolution)
    return 3 * width * h * w * batch * (4 if mixed_precision == "no" else 2)


def positional_limit(model_dir: Path, family: str) -> int | None:
    """The largest resolution a transformer's learned position embedding covers (``pos_embed_max_size``: SD3/3.5),
    or None where there is none (rotary embeddings, UNets)."""
    tf = _config(model_dir / "transformer" / "config.json")
    vae = _config(model_dir / "vae" / "config.json")
    most, patch = tf.get("pos_embed_max_size"), tf.get("patch_size") or 1
    factor = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
    return int(most) * int(patch) * factor if most else None


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes this run may take, where): the GPU's free memory, or on a CPU the host's available memory (within
    a cgroup's limit), so that a run does not take what other processes on a shared host use."""
    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    limit = _cgroup_room()
    if limit is not None:
        found.append(limit)
    return (min(found) if found else None), "available on this host"


def _cgroup_room() -> int | None:
    """A cgroup v2 memory limit's room (limit minus use), or None where there is none."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def check_fits(cfg, model_dir: Path, family: str, device, mixed_precision: str | None, force: bool = False) -> None:
    """Refuse, in one line with the numbers, a ``--resolution`` beyond the model's positional limit, or a
    resolution and batch whose decode alone cannot fit in the memory this run may take (unless ``force``)."""
    if not cfg.resolution:
        return  # the model's native size
    res = cfg.resolution
    most = positional_limit(model_dir, family)
    if most and max(hw(res)) > most:
        raise UserError(
            f"--resolution {res} is larger than this model's position embedding allows (its transformer's "
            f"pos_embed_max_size); use at most {most}"
        )
    need = decode_floor_bytes(model_dir, res, int(cfg.batch_size), mixed_precision)
    _refuse_beyond(
        need,
        device,
        force,
        f"--resolution {res} with --batch-size {cfg.batch_size}",
        "the VAE decode",
        "lower --resolution or --batch-size (`rewardtune plan` predicts the whole step)",
    )


def _refuse_beyond(need: int, device, force: bool, what: str, part: str, instead: str) -> None:
    """The one refusal: ``what`` needs at least ``need`` bytes in ``part`` and the device has less."""
    have, where = available_bytes(device)
    if have is not None and need > have and not force:
        raise UserError(
            f"{what} needs at least {need / GIB:,.1f} GiB for {part} alone, and {have / GIB:,.1f} GiB is {where}; "
            f"{instead}, or pass --force to run anyway"
        )


def tower_floor_bytes(backbone_dir: Path, images: int, mixed_precision: str | None) -> int:
    """The least memory a reward-training micro-batch of ``images`` images needs in the CLIP image tower: one
    activation (tokens x width) per image for each layer, kept for the backward pass."""
    vision = _config(backbone_dir / "config.json").get("vision_config") or {}
    size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 14))
    tokens = (size // patch) ** 2 + 1
    per_image = tokens * int(vision.get("hidden_size", 1024)) * int(vision.get("num_hidden_layers", 24))
    return per_image * images * (4 if mixed_precision == "no" else 2)


def check_batch_fits(backbone_dir: Path, batch: int, mixed_precision: str | None, force: bool = False) -> None:
    """train-reward's check: ``--batch-size`` triplets (three images each) through the image tower."""
    need = tower_floor_bytes(backbone_dir, 3 * batch, mixed_precision)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    _refuse_beyond(
        need,
        device,
        force,
        f"--batch-size {batch} ({3 * batch} images)",
        "the image tower's activations",
        "lower --batch-size (raise --grad-accum to keep the global batch)",
    )


def _config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
