"""Training end to end on a tiny model: falling loss, accumulation, resume, output-dir rules,
CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import REPO, SAMPLE_DATA

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.train.loop import train


def cfg(model, out, **kw):
    base = dict(
        model=str(model),
        data=str(SAMPLE_DATA),
        output_dir=str(out),
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lora_dropout=0.0,
        max_seq_length=256,
        plot=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def adapter(out):
    return mx.load(str(out / "adapter_model.safetensors"))


def max_diff(a, b):
    assert set(a) == set(b)
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def test_loss_falls_and_contract_files(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = train(
        cfg(
            tiny_model,
            out,
            max_steps=40,
            save_steps=20,
            learning_rate=3e-3,
            val_split=0.1,
            per_device_train_batch_size=4,
            plot=True,
            logging_steps=5,
        ),
        progress=False,
    )
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses
    assert evals[-1] < evals[0], evals
    assert state["global_step"] == 40 and res.global_step == 40
    assert state["best_model_checkpoint"].endswith("checkpoint-40")
    assert all(
        {"loss", "grad_norm", "learning_rate", "epoch", "step"} <= set(h)
        for h in state["log_history"]
        if "loss" in h
    )
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "checkpoint-20/optimizer.safetensors",
        "checkpoint-40/adapter_model.safetensors",
        "checkpoint-40/trainer_state.json",
    ):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*")), "temporary files left behind"


def test_accumulation_equals_the_larger_batch(tiny_model, tmp_path):
    big = train(
        cfg(
            tiny_model,
            tmp_path / "b4",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
        ),
        progress=False,
    )
    acc = train(
        cfg(
            tiny_model,
            tmp_path / "b2x2",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        ),
        progress=False,
    )
    assert (
        max_diff(adapter(big.output_dir), adapter(acc.output_dir)) <= 2e-5
    )  # fp32 summation order only
    # not trivially equal: a different batch gives a different adapter
    other = train(
        cfg(
            tiny_model,
            tmp_path / "b2",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
        ),
        progress=False,
    )
    assert max_diff(adapter(big.output_dir), adapter(other.output_dir)) > 1e-4


@pytest.mark.parametrize("optim", ["adamw", "adam", "sgd", "adafactor", "muon"])
def test_resume_equals_uninterrupted(tiny_model, tmp_path, optim):
    """Exact for every optimizer: its state (moments, factored second moments, momentum) is
    checkpointed and restored."""
    kw = dict(
        lora_dropout=0.1,
        gradient_accumulation_steps=2,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        optim=optim,
        weight_decay=0.0 if optim == "adam" else 0.01,
    )
    full = train(cfg(tiny_model, tmp_path / "full", **kw), progress=False)
    out = tmp_path / "cut"
    train(cfg(tiny_model, out, **kw), progress=False)
    # Simulate a run killed right after checkpoint-3 was written.
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-6")
    (out / ".checkpoint-6.tmp-dead").mkdir()  # a half-written checkpoint must be ignored
    resumed = train(cfg(tiny_model, out, resume="latest", **kw), progress=False)
    assert resumed.global_step == 6
    assert max_diff(adapter(full.output_dir), adapter(out)) <= 1e-5
    if optim != "adamw":  # the optimizer really is another one: AdamW ends elsewhere
        adamw = {**kw, "optim": "adamw", "weight_decay": 0.1}
        other = train(cfg(tiny_model, tmp_path / "adamw", **adamw), progress=False)
        assert max_diff(adapter(full.output_dir), adapter(other.output_dir)) > 1e-5
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_finished_run_is_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_model, out, max_steps=2), progress=False)
    with pytest.raises(MlxLoraError, match="holds a finished run.*--overwrite-output-dir"):
        train(cfg(tiny_model, out, max_steps=2), progress=False)
    train(cfg(tiny_model, out, max_steps=1, overwrite_output_dir=True), progress=False)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(per_device_train_batch_size=1000), "larger than the .* training examples"),
        (dict(learning_rate=-1.0), "--learning-rate must be > 0"),
        (dict(per_device_train_batch_size=0), "batch-size must be > 0"),
        (dict(max_seq_length=0), "--max-seq-length must be at least 2"),
        (dict(target_modules="q,qkv"), "unknown target module"),
        (dict(data="/nonexistent.json"), "not found"),
    ],
)
def test_bad_settings(tiny_model, tmp_path, kw, msg):
    with pytest.raises(MlxLoraError, match=msg):
        train(cfg(tiny_model, tmp_path / "x", **kw), progress=False)
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MlxLoraError, match="no \\*.safetensors"):
        train(cfg(tmp_path / "m", tmp_path / "x"), progress=False)


def test_cli_one_line_error_and_help(tiny_model, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lora.train",
            "--model",
            str(tiny_model),
            "--data",
            str(tmp_path / "no.json"),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip().count("\n") == 0
        and r.stderr.startswith("error: data file")
        and "Traceback" not in r.stderr
    )
    h = subprocess.run(
        [sys.executable, "-m", "mlx_lora.train", "--help"], capture_output=True, text=True, cwd=REPO
    )
    for flag in (
        "--num-train-epochs",
        "--max-steps",
        "--per-device-train-batch-size",
        "--gradient-accumulation-steps",
        "--learning-rate",
        "--lr-scheduler-type",
        "--warmup-steps",
        "--logging-steps",
        "--save-steps",
        "--eval-steps",
        "--val-split",
        "--early-stopping-patience",
        "--gradient-checkpointing",
        "--lora-r",
        "--lora-alpha",
        "--lora-dropout",
        "--target-modules",
        "--quantize",
        "--max-seq-length",
        "--system-prompt",
        "--format",
        "--seed",
        "--resume",
        "--model-source",
        "--config",
    ):
        assert flag in h.stdout, flag


def test_yaml_config_and_flags_win(tiny_model, tmp_path):
    from mlx_lora.config import parse_config

    y = tmp_path / "t.yaml"
    y.write_text(
        f"model: {tiny_model}\nlearning_rate: 0.002\ntarget-modules: [q_proj, v_proj]\nlora_r: 4\n"
    )
    c = parse_config(TrainConfig, ["--config", str(y), "--lora-r", "16"], "p", "d")
    assert (c.learning_rate, c.target_modules, c.lora_r, c.model) == (
        0.002,
        "q_proj,v_proj",
        16,
        str(tiny_model),
    )
    y.write_text("lerning_rate: 1\n")
    with pytest.raises(MlxLoraError, match="unknown option 'lerning_rate'"):
        parse_config(TrainConfig, ["--config", str(y)], "p", "d")
