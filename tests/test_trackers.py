"""--report-to trackers (offline, read back), --optim and --lora-layers.

Every tracker test runs training in this process with a guard that fails on any socket to
anything but localhost: tracking must never need the network here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REPO, SAMPLE_DATA, make_tiny_model

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.train.loop import train
from mlx_lora.train.trackers import parse_report_to

CONVERTER_PY = REPO / ".converter" / "venv" / "bin" / "python"


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on a connection to anything that is not this machine."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "::1", "localhost")
            and "/" not in host
        ):
            raise AssertionError(f"a tracker tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for key in ("WANDB_API_KEY", "SWANLAB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/root"))


def cfg(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=str(SAMPLE_DATA),
        output_dir=str(out),
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        eval_steps=2,
        val_split=0.1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lora_dropout=0.0,
        max_seq_length=256,
        plot=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def history(out: Path, key: str) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(h["step"], h[key]) for h in state["log_history"] if key in h]


def test_tensorboard_scalars_equal_trainer_state_and_resume_appends(
    tiny_model, tmp_path, no_network
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(cfg(tiny_model, out, report_to="tensorboard", run_name="first"), progress=False)
    train(
        cfg(tiny_model, out, report_to="tensorboard", max_steps=6, resume="latest"), progress=False
    )
    runs = list((out / "runs").iterdir())
    assert [r.name for r in runs] == ["first"]  # the resumed run wrote into the same run
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = history(out, "loss")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6] == [s for s, _ in want]
    assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert np.allclose([v for _, v in evals], [v for _, v in history(out, "eval_loss")])
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(
        acc.Tags()["scalars"]
    )


def test_mlflow_metrics_read_back(tiny_model, tmp_path, no_network):
    pytest.importorskip("mlflow")
    import mlflow

    out = tmp_path / "mlf"
    train(cfg(tiny_model, out, report_to="mlflow", project_name="proj"), progress=False)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
    want = history(out, "loss")
    assert [s for s, _ in got] == [s for s, _ in want]
    assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora_r"] == "8"


def test_swanlab_and_wandb_offline_runs_are_written_and_closed(tiny_model, tmp_path, no_network):
    pytest.importorskip("swanlab")
    pytest.importorskip("wandb")
    out = tmp_path / "sw"
    train(cfg(tiny_model, out, report_to="swanlab,wandb"), progress=False)
    state = json.loads((out / "trackers.json").read_text())
    assert state["swanlab"]["id"] and state["wandb"]["id"]
    swan = list((out / "swanlog").glob(f"run-*-{state['swanlab']['id']}"))
    assert swan and list(swan[0].glob("*.swanlab"))
    wb = list((out / "wandb").glob(f"offline-run-*-{state['wandb']['id']}"))
    assert wb and list(wb[0].glob("*.wandb")) and list(wb[0].glob("*.wandb"))[0].stat().st_size > 0


def test_a_failing_tracker_warns_once_and_training_goes_on(
    tiny_model, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("tensorboard")
    from mlx_lora.train import trackers

    def broken(self, values, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoardTracker, "_write", broken)
    res = train(cfg(tiny_model, tmp_path / "x", report_to="tensorboard"), progress=False)
    assert res.global_step == 4 and (tmp_path / "x" / "adapter_model.safetensors").is_file()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "--report-to" in ln]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_report_to_names_and_missing_packages(monkeypatch):
    import importlib.util

    assert parse_report_to("none") == [] and parse_report_to(None) == []
    with pytest.raises(MlxLoraError, match="not a tracker"):
        parse_report_to("tensorboard,comet")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(MlxLoraError, match=r'pip install "mlx_lora\[wandb\]"'):
        parse_report_to("wandb")
    assert "wandb" not in parse_report_to("all")


# ------------------------------------------------------------------------------ --lora-layers


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "l4", layers=4, arch="llama")


def test_lora_layers_adapts_the_last_blocks_only(four_layers, tmp_path):
    out = tmp_path / "ll"
    train(cfg(four_layers, out, lora_layers=2, max_steps=3, val_split=0.0), progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2, 3] and config["layers_pattern"] == "layers"
    names = mx.load(str(out / "adapter_model.safetensors"))
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in names}
    assert layers == {2, 3}
    with pytest.raises(MlxLoraError, match="--lora-layers must be between 1 and the model's 4"):
        train(cfg(four_layers, tmp_path / "bad", lora_layers=5, val_split=0.0), progress=False)


@pytest.mark.slow
def test_lora_layers_adapter_equals_peft_and_llama_cpp(four_layers, tmp_path):
    """PEFT loads the partial adapter (layers_to_transform) and computes our logits; the GGUF
    LoRA adapter holds only those layers and llama.cpp agrees (export --mode adapter --verify)."""
    from mlx_lora.export.pipeline import ExportConfig, export
    from mlx_lora.model.load import load_for_inference

    out = tmp_path / "ll"
    train(
        cfg(four_layers, out, lora_layers=2, max_steps=8, learning_rate=5e-3, val_split=0.0),
        progress=False,
    )
    ids = [1, 5, 9, 12, 40, 7, 3]
    ours = np.array(load_for_inference(str(four_layers), out).model(mx.array([ids]))[0])
    if not CONVERTER_PY.exists():
        pytest.skip("no converter venv with torch + peft: run bash scripts/setup_converter.sh")
    ref_file = tmp_path / "peft.npy"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    subprocess.run(
        [
            str(CONVERTER_PY),
            str(REPO / "tests" / "tools" / "peft_logits.py"),
            str(four_layers),
            str(out),
            str(ref_file),
            *map(str, ids),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    ref = np.load(ref_file)
    base = np.array(load_for_inference(str(four_layers)).model(mx.array([ids]))[0])
    assert np.abs(ref - base).max() > 1e-3  # the adapter changes the logits...
    assert np.abs(ref - ours).max() < 1e-4  # ...and PEFT's change is ours
    r = export(
        ExportConfig(
            model=str(four_layers),
            adapter=str(out),
            output_dir=str(tmp_path / "exp"),
            gguf_type="f32",
            mode="adapter",
            verify=True,
        ),
        progress=False,
        log=False,
    )
    assert r.report.ok, r.report.table()
    import gguf

    names = [t.name for t in gguf.GGUFReader(r.lora_gguf).tensors]
    assert names and {int(n.split(".")[1]) for n in names} == {2, 3}
