"""Tiny real models for tests, benchmarks and the demo's builder; not for users' runs.

Real transformers/diffusers models from small configs, with the real CLIP tokenizer, saved the way users'
files look so that tests go through the loading code a user hits. Nothing here downloads.
"""

from .clip import (
    SMALL_IMAGE_CLIP,
    perturbed_state_dict,
    save_tiny_clip,
    tiny_clip_config,
    write_clip_processor,
    write_tiny_reward_world,
)
from .flow_pipelines import build_tiny_flow_pipeline, save_tiny_flow_pipeline
from .pipelines import (
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_scheduler,
    tiny_unet,
    tiny_vae,
)

__all__ = [
    "SMALL_IMAGE_CLIP",
    "build_tiny_flow_pipeline",
    "build_tiny_pipeline",
    "save_tiny_flow_pipeline",
    "perturbed_state_dict",
    "save_tiny_clip",
    "save_tiny_pipeline",
    "tiny_clip_config",
    "tiny_scheduler",
    "tiny_unet",
    "tiny_vae",
    "write_clip_processor",
    "write_tiny_reward_world",
]
