"""The large text encoders of the flow families (issue #23): their embeddings stored once and reused
(``rewardtune encode-prompts``, ``--prompt-embeddings``: a run with every prompt stored never loads the encoder),
kept on the CPU (``--text-encoder-device cpu``) or quantized (``--quantize-text-encoder``). On tiny real SD3
pipelines saved the way users' files look."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import T5EncoderModel

from rewardtune.cli import main
from rewardtune.finetune import FinetuneConfig, Trainer
from rewardtune.finetune.families import by_name
from rewardtune.finetune.models import load_pipeline, make_adapter
from rewardtune.finetune.prompt_store import PromptStore, store_for
from rewardtune.testing.cli import run_cli
from rewardtune.testing.flow_pipelines import save_tiny_flow_pipeline

PROMPTS = ["a red cube", "a blue ball on a table", "two green cats"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_flow_pipeline(tmp_path_factory.mktemp("tiny_sd3_store"), "sd3")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _cfg(model, tmp_path, prompts_file, **kw) -> FinetuneConfig:
    base = dict(
        model=str(model), prompts=str(prompts_file), output=str(tmp_path / "out"), resolution=32, sample_steps=2,
        k=1, batch_size=1, eval_size=2, lora_rank=2, max_sequence_length=8, checkpoint_every=0,
        gradient_checkpointing=False,
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


class _Mean(torch.nn.Module):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def _embeddings(trainer: Trainer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {p: trainer.adapter.embeddings([p]) for p in [*PROMPTS, ""]}


def test_encode_prompts_fills_a_store_that_finetune_reads_without_loading_t5(sd3, tmp_path, prompts_file, capsys):
    store = tmp_path / "store"
    res = run_cli("encode-prompts", "--model", sd3, "--prompts", prompts_file, "--output", store,
                  "--max-sequence-length", 8)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 prompt(s) encoded, 0 already there" in res.stdout  # three prompts and the empty one
    (key_dir,) = [d for d in store.iterdir() if d.is_dir()]
    key = json.loads((key_dir / "key.json").read_text())
    assert (key["family"], key["encoder"], key["max_sequence_length"], key["quantize"]) == (
        "sd3",
        "text_encoder_3",
        8,
        "none",
    )
    assert len(list(key_dir.glob("*.safetensors"))) == 4
    args = ["encode-prompts", "--model", sd3, "--prompts", prompts_file, "--output", store, "--max-sequence-length", 8]
    assert main([str(a) for a in args]) == 0  # again, in this process: nothing left to encode
    assert "0 prompt(s) encoded, 4 already there" in capsys.readouterr().out

    pipe, family = load_pipeline(str(sd3))  # the reference: the conditioning with T5 loaded and run
    reference = make_adapter(pipe, family, _cfg(sd3, tmp_path, prompts_file))
    stored = Trainer(_cfg(sd3, tmp_path, prompts_file, prompt_embeddings=str(store)), reward=_Mean())
    assert pipe.text_encoder_3 is not None and stored.pipe.text_encoder_3 is None  # never loaded
    for p in [*PROMPTS, ""]:
        (h0, p0), (h1, p1) = reference.embeddings([p]), stored.adapter.embeddings([p])
        # the same conditioning (CLIP ran in another batch there: float noise)
        assert torch.allclose(h0, h1, atol=1e-6) and torch.allclose(p0, p1, atol=1e-6), p

    # another sequence length, dtype or quantization is another key: nothing stored under this one is read
    keys = {
        store_for(_cfg(sd3, tmp_path, prompts_file, prompt_embeddings=str(store), **kw), sd3, by_name("sd3"), dtype).dir
        for kw, dtype in (({}, torch.float32), ({"max_sequence_length": 6}, torch.float32), ({}, torch.bfloat16),
                          ({"quantize_text_encoder": "nf4"}, torch.float32))
    }  # fmt: skip
    assert len(keys) == 4 and key_dir in keys


def test_a_store_entry_of_another_prompt_is_not_read(tmp_path):
    store = PromptStore(tmp_path, {"family": "x"})
    store.put("a cat", {"t5": torch.ones(2)})
    assert torch.equal(store.get("a cat")["t5"], torch.ones(2)) and store.get("a dog") is None
    store._path("a dog").write_bytes(store._path("a cat").read_bytes())  # a file under the wrong name
    assert store.get("a dog") is None and store.missing(["a cat", "a dog"]) == ["a dog"]


def test_the_large_encoder_can_stay_on_the_cpu(sd3, tmp_path, prompts_file, monkeypatch):
    """--text-encoder-device cpu: T5 is never moved to the accelerator (recorded on a stand-in device, this
    machine having none); by default it is, to encode, and leaves again."""
    moves = []
    original = T5EncoderModel.to

    def record(self, *args, **kw):
        moves.append(str(args[0] if args else kw.get("device")))
        return self if str(moves[-1]) == "cuda" else original(self, *args, **kw)

    monkeypatch.setattr(T5EncoderModel, "to", record)
    for where, expect in (("cpu", []), ("accelerator", ["cuda"])):
        moves.clear()
        trainer = Trainer(_cfg(sd3, tmp_path, prompts_file, text_encoder_device=where), reward=_Mean())
        adapter = trainer.adapter
        adapter._device = torch.device("cuda")  # as if the run were on a GPU
        monkeypatch.setattr(type(adapter), "text_encoders", lambda self: [])
        adapter._fill(["a prompt never seen"], clip=False)
        assert [m for m in moves if m in ("cuda", "cpu")] == expect, (where, moves)


def test_the_large_encoder_can_be_quantized(sd3, tmp_path, prompts_file):
    """--quantize-text-encoder nf4: every Linear of T5 is bitsandbytes' 4-bit layer, and the embeddings are those of
    a full-precision T5 whose weights went through bitsandbytes' own NF4 quantize/dequantize (the reference)."""
    bnb = pytest.importorskip("bitsandbytes")
    nf4 = Trainer(_cfg(sd3, tmp_path, prompts_file, quantize_text_encoder="nf4"), reward=_Mean())
    kinds = {
        (n.rsplit(".", 1)[-1] == "wo", type(m).__name__)
        for n, m in nf4.pipe.text_encoder_3.named_modules()
        if "Linear" in type(m).__name__
    }
    # every Linear is 4-bit but T5's feed-forward output 'wo', kept in full precision (transformers'
    # _keep_in_fp32_modules) as its own quantizer keeps it
    assert kinds == {(True, "Linear"), (False, "Linear4bit")}
    pipe, family = load_pipeline(str(sd3))
    with torch.no_grad():
        for name, module in pipe.text_encoder_3.named_modules():
            if type(module) is torch.nn.Linear and not name.endswith(".wo"):
                q, state = bnb.functional.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4")
                module.weight.data = bnb.functional.dequantize_4bit(q, state).to(module.weight.dtype)
    reference = make_adapter(pipe, family, _cfg(sd3, tmp_path, prompts_file))
    for p in PROMPTS:
        t5 = nf4.adapter.embeddings([p])[0][:, -8:]  # the T5 tokens follow CLIP's 77
        assert torch.allclose(t5, reference.embeddings([p])[0][:, -8:], atol=1e-4), p


def test_encode_prompts_refuses_a_model_without_a_large_encoder(sd_model, tmp_path, prompts_file):
    res = run_cli("encode-prompts", "--model", sd_model, "--prompts", prompts_file, "--output", tmp_path / "s")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "SD 1.x/2.x models encode prompts with CLIP beside the denoiser" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()
