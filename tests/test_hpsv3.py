"""HPSv3: parity with the released code on tiny random weights, gradients to the pixels, errors, the CLI, the planner.

The reference is the release ``hpsv3==1.0.0`` (installed with --no-deps) where it runs under transformers 5:
``dataset/utils.py`` (``process_vision_info`` / ``fetch_image``: the resize), ``model/differentiable_image_processor.py``
(``Qwen2VLImageProcessor``, the tensor path: normalisation and patches), ``dataset/data_collator_qwen.py`` (the
instruction and ``prompt_with_special_token``), and transformers' ``Qwen2VLProcessor`` with the base's chat template
(the text and the image-token expansion, as ``inference.py`` ``prepare_batch`` calls it). The release's model class
(``model/qwen2vl_trainer.py`` ``Qwen2VLRewardModelBT``) was written for transformers 4.45 (``self.model.embed_tokens``)
and cannot run under 5.x; its ``__init__`` (the ranknet head) and ``forward`` are written out in ``_release_forward``,
over transformers' own ``Qwen2VLForConditionalGeneration`` loaded with transformers' own handling of 4.45 key names.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers.image_utils
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

from rewardtune.errors import OfflineError, UserError
from rewardtune.finetune.config import FinetuneConfig
from rewardtune.images import load_image
from rewardtune.plan import arch_config, build_reward, predict_peak_memory
from rewardtune.rewards import load_reward
from rewardtune.rewards.hpsv3 import FULL_CONFIG, FULL_VOCAB, smart_resize, vlm_config
from rewardtune.testing.cli import run_cli
from rewardtune.testing.hpsv3 import save_tiny_hpsv3

PROMPTS = ["a red cat on a mat", "a blue dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"), words=PROMPTS)


@pytest.fixture(scope="module")
def reward(tiny):
    ckpt, base = tiny
    return load_reward("hpsv3", hpsv3=str(ckpt), qwen2vl=str(base), dtype=torch.float32)


def _release_root() -> Path:
    spec = importlib.util.find_spec("hpsv3")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the reference package hpsv3==1.0.0 is not installed (pip install --no-deps hpsv3==1.0.0)")
    return Path(list(spec.submodule_search_locations)[0])


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def release(monkeypatch):
    """The release's preprocessing modules, loaded by path. Stand-ins: the ``hpsv3`` package (its ``__init__``
    imports the training stack: trl, fire, ...) and ``transformers.image_utils.VideoInput`` (moved in transformers 5;
    the processor file uses it in annotations only)."""
    root = _release_root()
    monkeypatch.setattr(transformers.image_utils, "VideoInput", list, raising=False)
    for name in ("hpsv3", "hpsv3.dataset"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        monkeypatch.setitem(sys.modules, name, stub)
    for name in ("hpsv3.dataset.utils", "hpsv3.dataset.data_collator_qwen", "hpsv3_processor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return types.SimpleNamespace(
        utils=_load("hpsv3.dataset.utils", root / "dataset" / "utils.py"),
        collator=_load("hpsv3.dataset.data_collator_qwen", root / "dataset" / "data_collator_qwen.py"),
        processor=_load("hpsv3_processor", root / "model" / "differentiable_image_processor.py"),
    )


def _release_batch(release, base: Path, images: torch.Tensor, prompts: list[str]):
    """inference.py ``prepare_batch`` with ``differentiable=True`` (train.py swaps in the tensor image processor)
    on images in [0, 255] as its ``test_differentiable.py`` passes them."""
    tok = AutoTokenizer.from_pretrained(str(base), padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    template = json.loads((base / "chat_template.json").read_text())["chat_template"]
    processor = Qwen2VLProcessor(
        image_processor=release.processor.Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),  # unused: no videos
        chat_template=template,
    )
    c = release.collator
    pixels = 256 * 28 * 28
    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image, "min_pixels": pixels, "max_pixels": pixels},
                    {"type": "text", "text": c.INSTRUCTION.format(text_prompt=text) + c.prompt_with_special_token},
                ],
            }
        ]
        for text, image in zip(prompts, images * 255, strict=True)
    ]
    image_inputs, _ = release.utils.process_vision_info(messages)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=image_inputs, padding=True, return_tensors="pt")
    return batch, tok.convert_tokens_to_ids("<|Reward|>")


def _release_model(ckpt: Path, base: Path, tmp: Path):
    """transformers' Qwen2VLForConditionalGeneration from the checkpoint's VLM tensors (4.45 key names, converted by
    transformers itself) and the ranknet ``rm_head`` of qwen2vl_trainer.py ``Qwen2VLRewardModelBT.__init__``
    (no rm_head_kwargs: hidden -> 1024 -> ReLU -> Dropout(0.05) -> 16 -> ReLU -> output_dim 2)."""
    state = load_file(str(ckpt / "HPSv3.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    (tmp / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp / "model.safetensors"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp), dtype=torch.float32, attn_implementation="sdpa")
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )
    head.load_state_dict({k[len("rm_head.") :]: v for k, v in state.items() if k.startswith("rm_head.")})
    return model.eval(), head.eval()


def _release_forward(model, head, batch, reward_id: int) -> torch.Tensor:
    """qwen2vl_trainer.py ``Qwen2VLRewardModelBT.forward`` (transformers 4.45 layout: ``self.model`` was the language
    model, ``self.visual`` the tower), reward_token 'special': the embeddings with the image's features scattered into
    the image tokens, the language model with the attention mask and no position ids, the head on every token, the
    logits at the special token; the inferencer reports [:, 0] (mu)."""
    input_ids = batch["input_ids"]
    embeds = model.model.language_model.embed_tokens(input_ids)
    visual = model.model.visual
    image_embeds = visual(batch["pixel_values"].type(visual.get_dtype()), grid_thw=batch["image_grid_thw"])
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image_embeds.pooler_output.to(embeds.dtype))
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=None
    ).last_hidden_state
    logits = head(hidden.float())
    pooled = logits[input_ids == reward_id, ...].view(input_ids.shape[0], -1)
    return pooled[:, 0]


@pytest.mark.parametrize("size", [(64, 48), (600, 520)])
def test_matches_the_released_code(release, tiny, reward, tmp_path, size):
    """The same scores as the release's preprocessing, prompt and model computation on the same tiny weights, fp32,
    within 1e-4; a small image (upscaled to 256 * 28 * 28 pixels) and a large one (downscaled, antialiased)."""
    ckpt, base = tiny
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    batch, reward_id = _release_batch(release, base, images, PROMPTS)
    h, w = smart_resize(*size)
    assert batch["image_grid_thw"].tolist() == [[1, h // 14, w // 14]] * 2
    assert 0.85 * 256 * 28 * 28 <= h * w <= 1.15 * 256 * 28 * 28  # floor or ceil to multiples of 28
    model, head = _release_model(ckpt, base, tmp_path)
    with torch.no_grad():
        want = _release_forward(model, head, batch, reward_id)
        got = reward(images, PROMPTS)
        patches, _ = reward.pixel_inputs(images)
        ids = reward.token_ids(PROMPTS, h * w // 14**2 // 4)
    assert torch.allclose(patches, batch["pixel_values"] / 1.0, atol=1e-4, rtol=0)
    for row, mask, released in zip(ids, batch["attention_mask"], batch["input_ids"], strict=True):
        assert row == released[mask.bool()].tolist()
    assert got.shape == (2,) and want.shape == (2,)
    assert (got - want).abs().max() < 1e-4, (got, want)
    assert (want[0] - want[1]).abs() > 1e-4  # the two (image, prompt) pairs score differently: the check can fail


def test_gradient_reaches_the_pixels(reward):
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(2), requires_grad=True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # frozen


def test_a_prompt_with_a_special_token_is_refused(reward):
    with pytest.raises(UserError, match="special tokens"):
        reward(torch.rand(1, 3, 28, 28), ["a cat <|image_pad|>"])


def test_default_dtype_is_bf16_with_an_fp32_head(tiny):
    ckpt, base = tiny
    r = load_reward("hpsv3", hpsv3=str(ckpt / "HPSv3.safetensors"), qwen2vl=str(base))
    assert {p.dtype for p in r.vlm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in r.head.parameters()} == {torch.float32}
    assert not hasattr(r.vlm, "lm_head")
    score = r(torch.rand(1, 3, 32, 32), PROMPTS[:1])
    assert score.dtype == torch.float32 and torch.isfinite(score).all()


def test_bad_sources_are_one_line_errors(tiny, tmp_path):
    ckpt, base = tiny
    with pytest.raises(UserError, match=r"HPSv3 checkpoint: none of \[HPSv3.safetensors"):
        load_reward("hpsv3", hpsv3=str(tmp_path), qwen2vl=str(base))
    state = load_file(str(ckpt / "HPSv3.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(UserError, match="no rm_head"):
        load_reward("hpsv3", hpsv3=str(tmp_path), qwen2vl=str(base))
    with pytest.raises(UserError, match="Qwen2-VL base of HPSv3"):
        load_reward("hpsv3", hpsv3=str(ckpt), qwen2vl=str(tmp_path))


def test_cli_score(tiny, tmp_path):
    """``rewardtune score --reward hpsv3`` in a subprocess gives the Python API's score."""
    ckpt, base = tiny
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 32), (200, 30, 60)).save(img)
    r = run_cli("score", img, "--prompt", PROMPTS[0], "--reward", "hpsv3", "--hpsv3", ckpt, "--qwen2vl", base,
                "--json", "--dtype", "fp32")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    want = load_reward("hpsv3", hpsv3=str(ckpt), qwen2vl=str(base), dtype=torch.float32)(
        load_image(img)[None], PROMPTS[:1]
    )
    assert abs(json.loads(r.stdout)[0]["hpsv3"] - want.item()) < 1e-4


def test_offline_without_the_release_names_both_sources(monkeypatch):
    """Offline, with neither release in the hub cache: one error naming the checkpoint and the base, before loading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        load_reward("hpsv3")
    line = str(err.value)
    assert "\n" not in line
    for text in ("HPSv3 checkpoint (--hpsv3)", "MizzenAI/HPSv3", "(--qwen2vl)", "Qwen/Qwen2-VL-7B-Instruct"):
        assert text in line, line


# ----- the planner: the full-size architecture and its memory ----------------------------------------------------

QWEN2VL_7B_PARAMS = 8_291_375_616  # Qwen/Qwen2-VL-7B-Instruct, lm_head included (the hub's 8.29B)
HEAD_PARAMS = 3584 * 1024 + 1024 + 1024 * 16 + 16 + 16 * 2 + 2  # the ranknet rm_head on hidden size 3584


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_is_qwen2vl_7b_plus_the_head():
    """``build_full_size``: Qwen2-VL-7B-Instruct (as transformers builds it from the shipped config) without its
    lm_head, the embeddings resized to 151,658 tokens as the release resizes them, plus the head: 7,748,610,610."""
    reward = build_reward("hpsv3", torch.bfloat16, "meta")
    with torch.device("meta"):
        qwen = Qwen2VLForConditionalGeneration(vlm_config(arch_config(FULL_CONFIG)))
    assert _count(qwen) == QWEN2VL_7B_PARAMS
    hidden, vocab = 3584, 152064
    assert _count(reward) == QWEN2VL_7B_PARAMS - vocab * hidden - (vocab - FULL_VOCAB) * hidden + HEAD_PARAMS
    assert _count(reward) == 7_748_610_610
    assert {p.dtype for p in reward.vlm.parameters()} == {torch.bfloat16}


def test_planner_counts_hpsv3_and_its_offload(sd_model):
    """``plan --reward hpsv3`` on a tiny SD: the full-size reward's bf16 weights (14.4 GiB) are resident, its scoring
    of one 448 x 448 image (what every image becomes) adds GiBs in the reward's phases; with --reward-offload they are
    counted in the reward's phases only."""
    base = dict(model=str(sd_model), output="unused", k=1, sample_steps=2, mixed_precision="bf16", reward="hpsv3")
    on = predict_peak_memory(FinetuneConfig(**base))
    off = predict_peak_memory(FinetuneConfig(**base, reward_offload=True))
    towers = on["resident_mib"] - off["resident_mib"]
    assert 14.3 * 1024 < towers < 14.6 * 1024  # 7.75e9 bf16 weights (the head's 3.7e6 in fp32)
    assert on["weights_mib"] - off["weights_mib"] == pytest.approx(towers)
    p_on, p_off = on["part_peaks_mib"], off["part_peaks_mib"]
    assert p_on["reward"] - p_on["decode"] > 1024 and p_on["backward:reward"] > p_on["decode"]
    for phase in ("grad_steps", "decode"):
        assert p_off[phase] == pytest.approx(p_on[phase] - towers, abs=1e-6), phase
    assert p_off["reward"] == pytest.approx(p_on["reward"], abs=1e-6)
    assert on["peak_mib"] == pytest.approx(max(p_on["reward"], p_on["backward:reward"]))
