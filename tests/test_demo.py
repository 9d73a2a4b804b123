"""``python -m mlx_lora.demo``: the README's "does my install work" command, run as a user runs
it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from mlx_lora.core.errors import MlxLoraError

BUDGET_SECONDS = 120  # the promise: under 2 minutes on 2 CPU cores


@pytest.mark.slow
def test_demo_runs_offline_and_leaves_every_artifact(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lora.demo", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=2 * BUDGET_SECONDS,
    )
    wall = time.perf_counter() - t0
    print(f"\ndemo wall time {wall:.1f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < BUDGET_SECONDS

    for rel in (
        "tiny-model/config.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/trainer_state.json",
        "export/mlx-lora-demo-hf/model.safetensors",
        "export/mlx-lora-demo.gguf",
        "export/Modelfile",
        "export/export.json",
    ):
        assert (out / rel).is_file(), rel
    for printed in (
        "tiny-model",
        "adapter",
        "export/mlx-lora-demo-hf",
        "export/mlx-lora-demo.gguf",
        "export/Modelfile",
    ):
        assert str((out / printed).resolve()) in proc.stdout, printed
    state = json.loads((out / "adapter" / "trainer_state.json").read_text())
    assert state["global_step"] == 150
    # the fine-tune visibly worked: the tiny model answers with the identity it was trained on
    assert "model:  '我是甄嬛，家父是大理寺少卿甄远道。'" in proc.stdout
    modelfile = (out / "export" / "Modelfile").read_text()
    assert (
        'FROM "./mlx-lora-demo.gguf"' in modelfile
        and "现在你要扮演皇帝身边的女人--甄嬛" in modelfile
    )
    for header in (
        "[1/6] tiny model",
        "[2/6] LoRA training",
        "[3/6] one chat answer",
        "[4/6] export",
        "[5/6] verify",
        "[6/6] ollama create",
        "artifacts:",
        "OK: every stage ran",
    ):
        assert header in proc.stdout, header
    assert "GGUF read back vs HF folder            ok" in proc.stdout
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "logits llama.cpp vs MLX (3 prompts)    ok" in proc.stdout
    else:
        assert 'pip install "mlx_lora[verify]"' in proc.stdout

    # A rerun replaces its own folder; a folder with foreign files is refused untouched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    from mlx_lora.demo import prepare_dir

    with pytest.raises(MlxLoraError, match="did not write"):
        prepare_dir(foreign)
    assert (foreign / "mine.txt").read_text() == "keep"
    prepare_dir(out)
    assert [p.name for p in out.iterdir()] == [".mlx_lora_demo"]


def test_demo_data_ships_with_the_package(tmp_path):
    """The demo's sample is package data (the checkout's dataset/huanhuan.json links to it)."""
    from mlx_lora.demo import demo_dataset
    from mlx_lora.testing import SAMPLE_DATA

    assert SAMPLE_DATA.is_file() and SAMPLE_DATA.is_relative_to(REPO / "mlx_lora")
    assert (REPO / "dataset" / "huanhuan.json").resolve() == SAMPLE_DATA
    subset = json.loads(demo_dataset(tmp_path).read_text(encoding="utf-8"))
    assert subset and all(r["instruction"] == "你是谁？" and "甄嬛" in r["output"] for r in subset)


@pytest.mark.slow
def test_demo_runs_from_a_built_wheel_in_an_empty_folder(tmp_path):
    """``pip install .`` (not editable) then ``python -m mlx_lora.demo`` anywhere: the wheel holds
    the tiny-model builder and the sample. The wheel is installed into its own folder that comes
    first on the path, so nothing is read from the checkout."""
    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("mlx_lora-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import mlx_lora.testing as t; print(t.SAMPLE_DATA)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(target), where
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lora.demo", "--output-dir", "demo", "--steps", "60"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (cwd / "demo" / "export" / "Modelfile").is_file() or list(
        (cwd / "demo").rglob("Modelfile")
    )
