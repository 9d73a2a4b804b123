"""python -m mlx_lora.eval (base vs tuned) and DoRA (PEFT's use_dora) against PEFT itself."""

from __future__ import annotations

import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REPO, SAMPLE_DATA, make_tiny_model

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.eval.compare import EvalConfig, evaluate_adapter
from mlx_lora.model.load import load_base, load_for_inference
from mlx_lora.model.lora import apply_lora, set_active
from mlx_lora.train.loop import train

CONVERTER_PY = REPO / ".converter" / "venv" / "bin" / "python"
IDS = [1, 5, 9, 12, 40, 7, 3, 22]


def cfg(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=str(SAMPLE_DATA),
        output_dir=str(out),
        max_steps=30,
        save_steps=100,
        logging_steps=10,
        val_split=0.1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        lora_dropout=0.0,
        max_seq_length=256,
        plot=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    train(cfg(tiny_model, out, eval_at_end=True), progress=False)
    return out


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_tuned_beats_base_on_its_own_distribution_and_reports(trained, tmp_path):
    report = json.loads((trained / "eval.json").read_text())  # written by --eval-at-end
    assert report["tuned_loss"] < report["base_loss"] - 0.2, report
    assert report["examples"] == 14 and report["answers"]
    prompts = tmp_path / "q.txt"
    prompts.write_text("你是谁？\n<script>alert(1)</script> & 朕\n", encoding="utf-8")
    r = evaluate_adapter(
        EvalConfig(adapter=str(trained), prompts=str(prompts), output_dir=str(tmp_path / "r"))
    )
    assert r.base_loss == pytest.approx(report["base_loss"], rel=1e-5)
    assert [a["prompt"] for a in r.answers] == ["你是谁？", "<script>alert(1)</script> & 朕"]
    page = (tmp_path / "r" / "eval.html").read_text(encoding="utf-8")
    parsed = _Text()
    parsed.feed(page)
    text = "".join(parsed.text)
    assert "script" not in parsed.tags and "<script>alert(1)</script> & 朕" in text
    assert f"{r.tuned_loss:.4f}" in text and f"{r.base_loss:.4f}" in text
    assert "http" not in page  # self-contained: nothing fetched
    md = (tmp_path / "r" / "eval.md").read_text(encoding="utf-8")
    assert "| tuned |" in md and "你是谁？" in md


def test_the_base_is_the_tuned_model_switched_off(trained, tiny_model):
    loaded = load_for_inference(None, trained)
    base, _, _ = load_base(tiny_model, dtype=mx.float32)
    x = mx.array([IDS])
    set_active(loaded.model, False)
    assert mx.array_equal(loaded.model(x), base(x)).item()
    set_active(loaded.model, True)
    assert not mx.allclose(loaded.model(x), base(x)).item()


def test_eval_needs_held_out_data(tiny_model, tmp_path):
    with pytest.raises(MlxLoraError, match="--eval-at-end needs validation data"):
        train(cfg(tiny_model, tmp_path / "a", eval_at_end=True, val_split=0.0), progress=False)
    train(cfg(tiny_model, tmp_path / "b", val_split=0.0, max_steps=2), progress=False)
    with pytest.raises(MlxLoraError, match="records no validation split"):
        evaluate_adapter(EvalConfig(adapter=str(tmp_path / "b")))


# ------------------------------------------------------------------------------------- DoRA


def test_untrained_dora_is_the_base_model(tiny_model):
    model, _, _ = load_base(tiny_model, dtype=mx.float32)
    x = mx.array([IDS])
    before = model(x)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8, dora=True)
    assert mx.allclose(model(x), before, atol=1e-5).item()


def _converter(script: str, *args) -> None:
    if not CONVERTER_PY.exists():
        pytest.skip("no converter venv with torch + peft: run bash scripts/setup_converter.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    cmd = [str(CONVERTER_PY), str(REPO / "tests" / "tools" / script), *map(str, args)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_peft_made_adapters_give_peft_logits(llama, tmp_path, kind):
    """An adapter PEFT itself wrote (non-trivial B and, for DoRA, magnitudes) loads here and
    gives PEFT's logits."""
    _converter("peft_make_adapter.py", llama, tmp_path / "a", kind)
    _converter("peft_logits.py", llama, tmp_path / "a", tmp_path / "ref.npy", *IDS)
    ref = np.load(tmp_path / "ref.npy")
    ours = np.array(
        load_for_inference(str(llama), tmp_path / "a", dtype="float32").model(mx.array([IDS]))[0]
    )
    base = np.array(load_for_inference(str(llama), dtype="float32").model(mx.array([IDS]))[0])
    assert np.abs(ref - base).max() > 1e-2
    assert np.abs(ref - ours).max() < 1e-4


@pytest.mark.slow
def test_trained_dora_matches_peft_fuses_exactly_and_refuses_adapter_gguf(llama, tmp_path):
    from mlx_lora.export.fuse import fuse
    from mlx_lora.export.pipeline import ExportConfig, export

    out = tmp_path / "dora"
    train(cfg(llama, out, use_dora=True, max_steps=10, lora_dropout=0.1), progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    x = mx.array([IDS])
    ours = np.array(load_for_inference(str(llama), out).model(x)[0])
    _converter("peft_logits.py", llama, out, tmp_path / "ref.npy", *IDS)
    assert np.abs(np.load(tmp_path / "ref.npy") - ours).max() < 1e-4
    fused = fuse(str(llama), out, tmp_path / "fused", dtype="float32")
    assert np.abs(np.array(load_for_inference(str(fused)).model(x)[0]) - ours).max() < 1e-4
    with pytest.raises(MlxLoraError, match="--mode adapter cannot carry a DoRA adapter"):
        export(
            ExportConfig(
                model=str(llama), adapter=str(out), output_dir=str(tmp_path / "e"), mode="adapter"
            ),
            progress=False,
            log=False,
        )
