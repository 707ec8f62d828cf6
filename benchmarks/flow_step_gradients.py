"""How much LoRA gradient each Euler step of an SD3 schedule contributes (issue #22): the basis of the SD3 recipes' K.

DRaFT-K's LoRA gradient is the sum of what each of its K gradient steps contributes: step i's call, its input
detached, times the reward's gradient reaching that call's output through the later steps. So step i's own share
is the DRaFT-(N - i) gradient less the DRaFT-(N - i - 1) one, each a real ``Trainer.micro_step`` on the same
batch (prompts, noise) with no optimizer step in between. Recorded per step: sigma, |dt| and that share's norm.

No full-size SD3.5 weights exist here, so the model is the tiny SD3.5-Medium-like test pipeline
(``rewardtune.testing.flow_pipelines``: one dual-attention joint block, SD3's 16-channel VAE and the hub's
scheduler config, shift 3), 32 px, batch 4, LoRA rank 4 on SD3's default targets, fp32, the brightness reward
(mean pixel). The schedules are the models' own: SD3.5-Medium's 40 steps with classifier-free guidance 4.5, and
SD3.5-Large-Turbo's 4 steps without guidance. The sizes of a tiny model's gradients say nothing about a real
one's; the ratio between steps follows the schedule's dt (each Euler step moves the sample by dt * v)::

    python benchmarks/flow_step_gradients.py    # writes benchmarks/results/flow_step_gradients.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from checkpoint_calls import git_commit
from common import environment, write_results

from rewardtune.finetune import FinetuneConfig, Trainer
from rewardtune.finetune import lora as lora_mod
from rewardtune.finetune.flow import SMALL_STEP_DT
from rewardtune.testing.flow_pipelines import save_tiny_flow_pipeline

HERE = Path(__file__).resolve().parent
SCHEDULES = {"sd35-medium": "40 steps, CFG 4.5", "sd35-large-turbo": "4 steps, no guidance"}


class Brightness(torch.nn.Module):
    """Mean pixel value: a reward any generator can move."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def step_shares(model: Path, defaults_from: str, out: Path) -> list[dict]:
    """Per Euler step: sigma, |dt| and the norm of the LoRA gradient that step's call contributes."""
    cfg = FinetuneConfig(
        model=str(model),
        defaults_from=defaults_from,
        output=str(out),
        prompts="builtin:simple",
        method="draft-k",
        k=1,
        batch_size=4,
        lora_rank=4,
        lora_alpha=4.0,
        resolution=32,
        max_sequence_length=16,
        eval_every=0,
        eval_size=2,
        checkpoint_every=0,
        gradient_checkpointing=False,
    )
    trainer = Trainer(cfg, reward=Brightness())
    n = trainer.cfg.sample_steps
    params = lora_mod.trainable_parameters(*trainer.models_train)
    prompts, totals = trainer.batch_prompts(0, step=0), [None] * (n + 1)
    totals[0] = [torch.zeros_like(p) for p in params]
    for k in range(1, n + 1):
        trainer.cfg.k = k
        trainer.micro_step(prompts, trainer.batch_noise(0, step=0))
        totals[k] = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
    sigmas = trainer.sampler.sigmas.tolist()
    rows = []
    for i in range(n):
        k = n - i  # DRaFT-k's first gradient step is i
        share = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(totals[k], totals[k - 1])))
        rows.append(
            {"step": i + 1, "sigma": sigmas[i], "dt": sigmas[i] - sigmas[i + 1], "lora_grad_norm": float(share)}
        )
    return rows


def report(data: dict) -> str:
    env = data["env"]
    lines = [
        "# LoRA gradient per Euler step of SD3's schedules",
        "",
        f"Commit `{data['commit']}`, {env['date']}, {env['cpu']} ({env['cpu_count']} cores, shared), torch "
        f"{env['versions']['torch']}. `python benchmarks/flow_step_gradients.py`. Tiny SD3.5-Medium-like pipeline "
        "(one dual-attention joint block, SD3's scheduler config, shift 3), 32 px, batch 4, LoRA rank 4, fp32, "
        "brightness reward: the norms are this tiny model's, the ratios between steps are what carries over. "
        "Step i's share = the DRaFT-(N-i+1) LoRA gradient less the DRaFT-(N-i) one, same batch and noise.",
        "",
    ]
    for name, rows in data["schedules"].items():
        top = max(r["lora_grad_norm"] for r in rows)
        lines += [
            f"## {name} ({SCHEDULES[name]})",
            "",
            "| step | sigma | abs(dt) | LoRA gradient norm | / largest |",
            "| --- | --- | --- | --- | --- |",
        ]
        shown = rows if len(rows) <= 8 else rows[:2] + rows[-6:]
        for r in shown:
            lines.append(
                f"| {r['step']} | {r['sigma']:.4f} | {abs(r['dt']):.4f} | {r['lora_grad_norm']:.3e} "
                f"| {r['lora_grad_norm'] / top:.3f} |"
            )
        last, before = rows[-1]["lora_grad_norm"], rows[-2]["lora_grad_norm"]
        lines += [
            "",
            f"Last step / the step before: {last / before:.3f} (abs(dt) {abs(rows[-1]['dt']):.4f} against "
            f"{abs(rows[-2]['dt']):.4f}); DRaFT-1 gets {last / sum(r['lora_grad_norm'] for r in rows[-2:]):.1%} of "
            f"what DRaFT-2 adds up (norms, not summed vectors). Steps below abs(dt) {SMALL_STEP_DT}: "
            f"{', '.join(str(r['step']) for r in rows if abs(r['dt']) < SMALL_STEP_DT) or 'none'}.",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "flow_step_gradients"), help="results path without suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rewardtune-step-grads-"))
    model = save_tiny_flow_pipeline(work / "sd3", "sd3")
    data = {"commit": git_commit(), "env": environment(), "schedules": {}}
    for name in SCHEDULES:
        data["schedules"][name] = step_shares(model, name, work / name)
        print(name, "done", flush=True)
    write_results(args.out, data, report)
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
