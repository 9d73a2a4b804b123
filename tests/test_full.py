"""--finetune-type full: every weight trained, saved as a model folder that the commands open."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import SAMPLE_DATA

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.train.loop import train


def cfg(model, out, **kw) -> TrainConfig:
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
        max_seq_length=256,
        plot=False,
        finetune_type="full",
        system_prompt="你是甄嬛",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_full_fine_tune_trains_every_weight_resumes_exactly_and_is_a_model(tiny_model, tmp_path):
    from mlx_lora.infer.generate import complete
    from mlx_lora.model.load import load_for_inference

    full = train(cfg(tiny_model, tmp_path / "full"), progress=False)
    losses = [
        h["loss"]
        for h in json.loads((full.output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert losses[-1] < losses[0]
    base = mx.load(str(tiny_model / "model.safetensors"))
    tuned = mx.load(str(full.output_dir / "model.safetensors"))
    changed = [k for k in base if not mx.allclose(base[k].astype(mx.float32), tuned[k]).item()]
    assert len(changed) > len(base) // 2  # not a LoRA: the weights themselves moved
    out = tmp_path / "cut"
    train(cfg(tiny_model, out), progress=False)
    for name in ("model.safetensors", "trainer_state.json"):
        (out / name).unlink()
    resumed = train(cfg(tiny_model, out, resume="latest"), progress=False)
    assert resumed.global_step == 6
    again = mx.load(str(out / "model.safetensors"))
    assert max(mx.abs(again[k] - tuned[k]).max().item() for k in tuned) <= 1e-5
    loaded = load_for_inference(str(full.output_dir))
    assert loaded.system_prompt == "你是甄嬛"  # recorded like a fused model's
    assert complete(loaded, [{"role": "user", "content": "你是谁？"}], max_tokens=4).tokens


def test_full_fine_tune_refuses_what_it_cannot_do(tiny_model, tmp_path):
    with pytest.raises(MlxLoraError, match="cannot be quantized"):
        train(cfg(tiny_model, tmp_path / "q", quantize=4), progress=False)
    with pytest.raises(MlxLoraError, match="a full fine-tune has no adapter"):
        train(cfg(tiny_model, tmp_path / "e", eval_at_end=True, val_split=0.1), progress=False)
    train(cfg(tiny_model, tmp_path / "ok", max_steps=1, save_steps=1), progress=False)
    from mlx_lora.model.lora import read_adapter

    with pytest.raises(MlxLoraError, match="is a model folder .* pass it with --model"):
        read_adapter(tmp_path / "ok")


@pytest.mark.slow
def test_full_fine_tune_exports_and_verifies(tiny_model, tmp_path):
    from mlx_lora.export.pipeline import ExportConfig, export

    train(cfg(tiny_model, tmp_path / "full"), progress=False)
    r = export(
        ExportConfig(
            model=str(tmp_path / "full"),
            output_dir=str(tmp_path / "exp"),
            gguf_type="f32",
            verify=True,
        ),
        progress=False,
        log=False,
    )
    assert r.report.ok, r.report.table()
    assert "你是甄嬛" in r.modelfile.read_text(encoding="utf-8")
