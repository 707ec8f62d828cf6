"""Video rewards from image rewards, and the decode they need (video families: Wan).

- ``VideoReward`` applies any registry reward (``(B,3,H,W), prompts -> (B,)``) to chosen frames of a video
  ``(B,3,F,H,W)``: ``--frames N`` spread evenly over the video (first and last included), or ``all``; the frames'
  rewards make the video's by mean (default), min, or a weighted mean (``--frame-weights``, one per frame). All of
  it is torch, so the reward's gradient reaches the pixels of the chosen frames.
- ``decode_frames``: Wan's VAE is causal in time (3-D convolutions padded on the past side only, and its decode runs
  latent frame by latent frame with a cache of the past): latent frame 0 makes frame 0, latent frame c > 0 frames
  4c - 3 .. 4c, and none depends on a later latent frame. So the frames up to the last chosen one decode from the
  prefix of latents that makes them -- exactly the same pixels (tests/test_wan.py compares them) -- and the later
  latent frames are never decoded: with 4 evenly spread frames of 33 the last is the video's last, so nothing is
  saved; the saving is the share of the video after the last scored frame (``--frames`` choices that stop early).
  With gradients each latent frame's decoder call is a checkpoint of its own (``_decode_by_frame``), and inside it
  each decoder layer (``trainer.checkpoint_vae_decoder``, the causal cache slots a layer reads among its inputs):
  nothing of the decode is kept between the forward pass and the reward's backward but each latent frame's input,
  output and the causal cache it hands on -- on an accelerator in pinned host memory (``HostOffload``) -- and the
  backward pass recomputes one latent frame, one layer at a time (the planner put 1.3B at 480x832, 33 frames, at
  145 GiB with one checkpoint over the decode, 43.5 with one per frame, 22.0 with both and the host copies).
  docs/finetune.md, "Video".
- ``temporal_consistency``: the mean cosine similarity of consecutive frames' image embeddings (the reward's CLIP
  tower where it has one), logged at evaluation: a reward that scores frames alone can trade motion or coherence
  for per-frame scores, and this shows it.
- ``save_gif``: before/after animations (Pillow), and MP4 where ``imageio`` with its ffmpeg plugin is installed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.utils.checkpoint

from ..errors import UserError
from ..preflight import GIB, available_bytes

AGGREGATES = ("mean", "min", "weighted")


def parse_frames(spec: str, aggregate: str = "mean", weights: list | None = None) -> int | None:
    """The number of frames ``--frames`` asks for (None: all), after checking the options belong together."""
    spec = str(spec).strip().lower()
    if spec == "all":
        count = None
    else:
        try:
            count = int(spec)
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"--frames '{spec}': give a number of frames (1 or more) or 'all'")
    if aggregate not in AGGREGATES:
        raise UserError(f"--frame-aggregate '{aggregate}' is not one of {', '.join(AGGREGATES)}")
    if aggregate == "weighted":
        if not weights:
            raise UserError("--frame-aggregate weighted needs --frame-weights, one weight per scored frame")
        try:
            values = [float(w) for w in weights]
        except ValueError:
            raise UserError(f"--frame-weights {' '.join(map(str, weights))}: every weight must be a number") from None
        if count is not None and len(values) != count:
            raise UserError(f"--frame-weights gives {len(values)} weights for --frames {count}; give one per frame")
        if min(values) < 0 or sum(values) <= 0:
            raise UserError("--frame-weights: weights must be non-negative with a positive sum")
    elif weights:
        raise UserError(f"--frame-weights applies to --frame-aggregate weighted (the aggregate is {aggregate})")
    return count


def frame_indices(total: int, count: int | None) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames, first and last included (all for None)."""
    if count is None or count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(j * (total - 1) / (count - 1)) for j in range(count)})


def latent_frames_for(last_frame: int, temporal: int) -> int:
    """How many leading latent frames a causal video VAE (compression ``temporal`` in time) needs to make frames
    0..``last_frame``: latent frame 0 makes frame 0, latent frame c makes frames temporal*(c-1)+1 .. temporal*c."""
    return 1 if last_frame == 0 else (last_frame - 1) // temporal + 2


class VideoReward(torch.nn.Module):
    """An image reward applied to frames ``indices`` of videos (B,3,F,H,W), aggregated to (B,) by ``aggregate``. The
    videos may be decoded prefixes (``decode_frames``) that end at the last index."""

    def __init__(self, reward: torch.nn.Module, indices: list[int], aggregate: str = "mean", weights=None):
        super().__init__()
        self.reward, self.indices, self.aggregate = reward, list(indices), aggregate
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32) if weights else None
        if w is not None and len(w) != len(self.indices):
            raise UserError(f"--frame-weights gives {len(w)} weights for {len(self.indices)} scored frames")
        self.register_buffer("weights", None if w is None else w / w.sum(), persistent=False)

    def per_frame(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B, frames) rewards of the chosen frames."""
        if videos.dim() == 4:  # an image is a one-frame video
            videos = videos.unsqueeze(2)
        picked = videos[:, :, self.indices]  # (B, 3, n, H, W)
        b, n = picked.shape[0], picked.shape[2]
        flat = picked.permute(0, 2, 1, 3, 4).reshape(b * n, *picked.shape[1:2], *picked.shape[3:])
        rewards = self.reward(flat, [p for p in prompts for _ in range(n)])
        return rewards.reshape(b, n)

    def forward(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r = self.per_frame(videos, prompts)
        if self.aggregate == "min":
            return r.min(dim=1).values
        if self.aggregate == "weighted":
            return (r * self.weights.to(r.device, r.dtype)).sum(dim=1)
        return r.mean(dim=1)


def for_video(reward, adapter, cfg):
    """``reward`` as the video family's reward (``VideoReward`` on the frames ``cfg.frames`` picks), or itself for
    an image family (or None)."""
    if reward is None or not getattr(adapter, "video", False):
        return reward
    count = parse_frames(cfg.frames, cfg.frame_aggregate, cfg.frame_weights)
    indices = frame_indices(adapter.num_frames, count)
    return VideoReward(reward, indices, cfg.frame_aggregate, cfg.frame_weights)


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z, return_dict=False)[0]


def _decode_chunk(vae, x: torch.Tensor, first: bool, *cache):
    """One latent frame through the decoder, reading the causal cache ``cache`` (one argument per slot, so a
    checkpoint saves each tensor as it saves its inputs); returns the output and the cache it leaves."""
    advanced = list(cache)
    out = vae.decoder(x, feat_cache=advanced, feat_idx=[0], first_chunk=first)
    return (out, *advanced)


def _by_frame(vae, z: torch.Tensor) -> bool:
    """Whether ``vae`` decodes latent frame by latent frame with a cache we can hand on (Wan's AutoencoderKLWan,
    untiled), so that each frame can be a checkpoint of its own."""
    if not all(hasattr(vae, a) for a in ("_cached_conv_counts", "post_quant_conv", "decoder")):
        return False
    tiled = getattr(vae, "use_tiling", False) and (
        z.shape[-1] > vae.tile_sample_min_width // vae.spatial_compression_ratio
        or z.shape[-2] > vae.tile_sample_min_height // vae.spatial_compression_ratio
    )
    return not tiled


class HostOffload:
    """Saved-tensor hooks that keep what the per-latent-frame checkpoints hold between the decode and its backward
    pass -- each frame's input and the causal cache handed to it -- in host memory (pinned) while the accelerator
    works on, copied back when the backward pass reaches that frame. Tensors already on the host stay as they are;
    ``always``: copy host tensors too (the tests' way to run the copies on a CPU)."""

    def __init__(self, always: bool = False):
        self.always = always
        self.bytes = 0  # what the last decode kept in host memory

    def pack(self, t: torch.Tensor):
        if t.device.type == "cpu" and not self.always:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=True)
        self.bytes += host.nbytes
        return t.device, host

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _decode_by_frame(vae, z: torch.Tensor, host: HostOffload | None = None) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` (diffusers 0.42.1, untiled) with each latent frame's decoder call a checkpoint:
    post_quant_conv, the frames in order with the cache each leaves for the next (the first with
    ``first_chunk``), unpatchify where the VAE patches (Wan 2.2), clamp to [-1, 1]. The same pixels as
    ``vae.decode`` (tests/test_wan.py). ``host``: what each checkpoint keeps (its latent frame and the cache it
    reads) waits for the backward pass in host memory (``HostOffload``)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify  # noqa: PLC0415 - with the VAE

    x = vae.post_quant_conv(z)
    if host is not None:
        host.bytes = 0
    cache: list = [None] * vae._cached_conv_counts["decoder"]
    frames = []
    for i in range(x.shape[2]):
        with host.hooks() if host is not None else contextlib.nullcontext():
            out, *cache = torch.utils.checkpoint.checkpoint(
                _decode_chunk, vae, x[:, :, i : i + 1], i == 0, *cache, use_reentrant=False
            )
        frames.append(out)
    out = torch.cat(frames, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)


class HostCount(HostOffload):
    """``HostOffload`` that only counts what would go to the host: a packed tensor is let go (the device holds it no
    longer) and comes back as a new empty tensor of its shape on ``device`` (None: the default device, a fake tensor
    in the planner's trace, where its copy back is a new allocation as on the accelerator)."""

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device

    def pack(self, t: torch.Tensor):
        self.bytes += t.nbytes
        return t.shape, t.dtype

    def unpack(self, packed):
        shape, dtype = packed
        return torch.empty(shape, dtype=dtype, device=self.device)


def host_bytes(vae, shape: tuple[int, ...]) -> int:
    """The bytes ``HostOffload`` keeps on the host for a checkpointed decode of latents of ``shape`` (B,C,f,h,w) by
    ``vae``: a copy of the VAE built on the meta device from its config decodes meta latents (shapes only, about a
    second for Wan 2.1's VAE at 480x832 with 9 latent frames)."""
    with torch.device("meta"):
        twin = type(vae).from_config(vae.config).to(vae.dtype)
    z = torch.empty(shape, dtype=vae.dtype, device="meta", requires_grad=True)
    if not _by_frame(twin, z):
        return 0
    count = HostCount("meta")
    _decode_by_frame(twin, z, count)
    return count.bytes


def check_host_room(adapter, cfg, device, resolution) -> None:
    """Before a video run's first step on an accelerator: refuse in one line (unless ``--force``) when the pinned host
    memory its decode's per-frame checkpoints keep until their backward pass (``host_bytes``, for the frames up to
    the last scored one) is more than the host has available, instead of the host running out mid-step."""
    if not getattr(adapter, "video", False) or not cfg.gradient_checkpointing or device.type == "cpu":
        return
    count = parse_frames(cfg.frames, cfg.frame_aggregate, cfg.frame_weights)
    last = max(frame_indices(adapter.num_frames, count))
    c, f, h, w = adapter.latent_shape(resolution)
    shape = (int(cfg.batch_size), c, min(f, latent_frames_for(last, adapter.temporal_factor)), h, w)
    need = host_bytes(adapter.pipe.vae, shape)
    have, where = available_bytes(torch.device("cpu"))
    if have is not None and need > have and not cfg.force:
        raise UserError(
            f"--num-frames {adapter.num_frames} at {resolution} with --batch-size {cfg.batch_size}: the video decode's "
            f"per-frame checkpoints keep {need / GIB:,.1f} GiB in pinned host memory until their backward pass, and "
            f"{have / GIB:,.1f} GiB is {where}; lower --num-frames, --frames or --resolution (`rewardtune plan` "
            f"prints this figure), or pass --force to run anyway"
        )


def decode_frames(
    vae, z: torch.Tensor, last_frame: int | None, temporal: int, checkpointed: bool, host: HostOffload | None = None
) -> torch.Tensor:
    """Frames 0..``last_frame`` (None: all) of the videos of VAE latents ``z`` (B,C,f,h,w), decoded from the prefix of
    latent frames they need (the VAE is causal in time); with gradients and ``checkpointed``, a checkpoint per
    latent frame (or, for a VAE that does not decode frame by frame, one over the decode), what each keeps in host
    memory with ``host``."""
    if last_frame is not None:
        z = z[:, :, : latent_frames_for(last_frame, temporal)]
    if checkpointed and torch.is_grad_enabled() and z.requires_grad:
        if _by_frame(vae, z):
            out = _decode_by_frame(vae, z, host)
        else:
            out = torch.utils.checkpoint.checkpoint(_decode, vae, z, use_reentrant=False)
    else:
        out = _decode(vae, z)
    return out if last_frame is None else out[:, :, : last_frame + 1]


def _embedder(reward):
    """The first part of ``reward`` that embeds images (a CLIP tower's ``encode_image``), or None."""
    for module in reward.modules() if reward is not None else ():
        if callable(getattr(module, "encode_image", None)):
            return module.encode_image
    return None


@torch.no_grad()
def temporal_consistency(videos: torch.Tensor, reward=None) -> float:
    """The mean cosine similarity of consecutive frames of videos (B,3,F,H,W) in [0,1]: of the reward's image
    embeddings where it has an image tower, else of the frames' pixels (centred per frame). 1: frames alike."""
    if videos.dim() != 5 or videos.shape[2] < 2:
        return 1.0
    b, _, f = videos.shape[:3]
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * f, *videos.shape[1:2], *videos.shape[3:])
    embed = _embedder(reward)
    if embed is not None:
        e = embed(frames).float()
    else:
        e = frames.flatten(1).float()
        e = e - e.mean(dim=1, keepdim=True)
    e = torch.nn.functional.normalize(e.reshape(b, f, -1), dim=-1)
    return float((e[:, 1:] * e[:, :-1]).sum(-1).mean())


def save_gif(videos: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Videos (B,3,F,H,W) in [0,1] side by side as one animated GIF (Pillow), written atomically; an MP4 beside it
    where imageio can write one (its ffmpeg plugin installed). Returns the GIF's path."""
    from PIL import Image  # noqa: PLC0415 (only when a video run saves samples)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = torch.cat(list(videos.float().clamp(0, 1).cpu()), dim=-1)  # (3, F, H, B*W)
    frames = (row.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(f) for f in frames]
    tmp = path.with_name(f".{path.name}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    tmp.replace(path)
    _maybe_mp4(frames, path.with_suffix(".mp4"), fps)
    return path


def _maybe_mp4(frames, path: Path, fps: int) -> None:
    try:
        import imageio.v3 as iio  # noqa: PLC0415 (optional; not a dependency)
    except ImportError:
        return
    try:
        iio.imwrite(path, frames, fps=fps, extension=".mp4")
    except Exception:  # no ffmpeg plugin: the GIF stands alone
        path.unlink(missing_ok=True)
