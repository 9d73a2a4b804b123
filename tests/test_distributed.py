"""Data-parallel training with MLX's own engine: `mlx.launch --backend ring -n 2` on localhost."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import REPO, SAMPLE_DATA

from mlx_lora.config import TrainConfig
from mlx_lora.train.loop import train

LAUNCH = Path(sys.executable).parent / "mlx.launch"
FLAGS = [
    "--data",
    str(SAMPLE_DATA),
    "--max-steps",
    "4",
    "--save-steps",
    "2",
    "--gradient-accumulation-steps",
    "1",
    "--lora-dropout",
    "0",
    "--learning-rate",
    "1e-3",
    "--logging-steps",
    "1",
    "--max-seq-length",
    "256",
    "--no-plot",
]


def launch(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        str(LAUNCH),
        "--backend",
        "ring",
        "-n",
        "2",
        "--hosts",
        "127.0.0.1",
        sys.executable,
        "-m",
        "mlx_lora.train",
        "--model",
        str(model),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "2",
        *FLAGS,
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch not installed")
def test_two_processes_batch_2_equal_one_process_batch_4_and_resume(tiny_model, tmp_path):
    single = train(
        TrainConfig(
            model=str(tiny_model),
            data=str(SAMPLE_DATA),
            output_dir=str(tmp_path / "one"),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            lora_dropout=0.0,
            learning_rate=1e-3,
            logging_steps=1,
            max_seq_length=256,
            plot=False,
        ),
        progress=False,
    )
    ref = mx.load(str(single.output_dir / "adapter_model.safetensors"))

    out = tmp_path / "two"
    r = launch(tiny_model, out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "× 2 processes" in r.stdout
    got = mx.load(str(out / "adapter_model.safetensors"))
    assert max(mx.abs(ref[k] - got[k]).max().item() for k in ref) <= 1e-5

    # Interrupted after checkpoint-2, resumed by two processes: the same adapter again.
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-4")
    r = launch(tiny_model, out, "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (
        "resuming from" in r.stdout and r.stdout.count("resuming from") == 1
    )  # only rank 0 speaks
    got = mx.load(str(out / "adapter_model.safetensors"))
    assert max(mx.abs(ref[k] - got[k]).max().item() for k in ref) <= 1e-5
