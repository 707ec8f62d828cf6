"""The benchmark scripts run end to end on tiny models and write well-formed results (the numbers
themselves are measurements, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rewardtune.testing.cli import HANG_SECONDS, offline_env

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args, timeout=HANG_SECONDS):
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=offline_env(),  # one thread that does not spin, as every test subprocess: see rewardtune.threads
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_finetune_step_on_a_tiny_pipeline_writes_results(tmp_path):
    rec = tmp_path / "records.jsonl"
    run(
        "finetune_step.py",
        "--tiny",
        "sd",
        "--k",
        "2",
        "--sample-steps",
        "2",
        "--mixed-precision",
        "bf16",
        "--warmup",
        "0",
        "--timed",
        "1",
        "--track-tensors",
        "--name",
        "tiny-sd-k2",
        "--record",
        str(rec),
    )
    [r] = [json.loads(line) for line in rec.read_text().splitlines()]
    assert r["error"] is None and r["name"] == "tiny-sd-k2" and r["config"]["k"] == 2
    assert r["step_seconds_median"] > 0 and r["images_per_second"] > 0
    assert r["peak_memory_kind"] == "cpu_peak_rss" and r["peak_memory_mib"] > 0 and r["peak_tensor_mib"] > 0
    assert set(r["parts_seconds"]) == {"sample_prefix", "grad_steps", "decode", "reward", "backward", "optimizer"}
    assert r["ratio_step_to_parts"] > 0
    assert r["prediction"]["peak_mib"] > 0 and r["prediction_compared_to"] == "peak_tensor_mib"
    assert r["env"]["versions"]["torch"] and r["env"]["date"]

    run("report.py", str(rec), "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md"), "--title", "t")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["finetune"][0]["name"] == "tiny-sd-k2" and data["environment"]["device"] == "cpu"
    md = (tmp_path / "r.md").read_text()
    assert "| tiny-sd-k2 |" in md and "Parts of the step" in md and "torch 2" in md


def test_reward_benchmarks_score_and_train_on_tiny_towers(tmp_path):
    rec = tmp_path / "reward.jsonl"
    common = ["--tiny", "--warmup", "0", "--timed", "1", "--batch-size", "2", "--record", str(rec)]
    run("reward_bench.py", "--task", "score", "--reward", "icthp", "--image-size", "64", *common)
    run("reward_bench.py", "--task", "train-ict", "--checkpointing", *common)
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    assert [r["task"] for r in records] == ["score", "train-ict"]
    for r in records:
        assert r["error"] is None and r["kind"] == "reward" and r["items_per_second"] > 0 and r["peak_memory_mib"] > 0
    assert (
        records[0]["unit"] == "images/s" and records[1]["unit"] == "triplets/s" and records[1]["trainable_params"] > 0
    )


def test_report_keeps_failures_and_joins_predictions(tmp_path):
    rec, pred = tmp_path / "rec.jsonl", tmp_path / "pred.jsonl"
    rec.write_text(
        json.dumps({"name": "a", "error": "timeout after 90s (rc 124)", "source": "timeout"})
        + "\n"
        + json.dumps(
            {
                "name": "b",
                "source": "sdxl",
                "config": {"k": 1, "gradient_checkpointing": True},
                "peak_memory_mib": 20000.0,
                "peak_memory_kind": "cuda_max_allocated",
                "error": None,
                "step_seconds_median": 2.0,
                "parts_sum_seconds": 1.9,
                "ratio_step_to_parts": 2.0 / 1.9,
            }
        )
        + '\n{"name": "cut sh'
    )  # a line cut short by a kill
    pred.write_text(
        json.dumps({"kind": "prediction", "name": "b", "prediction": {"peak_mib": 21000.0}, "error": None}) + "\n"
    )
    run("report.py", str(rec), str(pred), "--json", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md"))
    data = json.loads((tmp_path / "r.json").read_text())
    by_name = {r["name"]: r for r in data["finetune"]}
    assert by_name["a"]["error"].startswith("timeout")
    assert abs(by_name["b"]["prediction_error"] - 0.05) < 1e-9
    assert any("b: peak 19.53 GiB vs target <= 24 GiB: met" in t for t in data["targets"])


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")]).returncode == 0


def test_cli_startup_benchmark_writes_its_record(tmp_path):
    """(benchmarks/threads.py has no smoke test here: with its cheapest run, two one-step demos, this test took 158 s at
    load 5; its committed record, benchmarks/results/threads.md, is its test.)"""
    run("cli_startup.py", "--repeats", "1", "--output", str(tmp_path / "startup"))
    startup = json.loads((tmp_path / "startup.json").read_text())
    assert {"rewardtune --help", "rewardtune --version", "rewardtune demo --help"} <= set(startup["results"])
    assert all(r["median"] > 0 for r in startup["results"].values()) and isinstance(startup["met"], bool)
