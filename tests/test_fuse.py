"""Fuse: the merged folder behaves exactly like base + adapter, and is a clean HF folder.

Real tiny models (Qwen2 and Llama architecture, from mlx_lora.testing.tiny_model) with nonzero
adapters; after QLoRA training the fused weights are checked tensor by tensor against
W + (alpha/r)·B·A computed here from the *unquantized* base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import SAMPLE_DATA, make_tiny_model

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.export.fuse import fuse
from mlx_lora.model.prompt import TOKENIZER_FILES
from mlx_lora.testing.adapter import random_adapter
from mlx_lora.verify.checks import load_mlx, mlx_logits

PROMPT_TEXTS = [
    "<|im_start|>user\n你好，请介绍一下你自己。<|im_end|>\n<|im_start|>assistant\n",
    "Hello world! 1234",
]


def _ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(t, add_special_tokens=True)["input_ids"] for t in PROMPT_TEXTS]


def _logits(model_dir: Path, adapter: Path | None = None) -> list[np.ndarray]:
    model, _ = load_mlx(model_dir, adapter)
    return [mlx_logits(model, ids) for ids in _ids(model_dir)]


def _max_delta(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _no_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp" in p.name or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuse")


@pytest.fixture(scope="module")
def tiny_llama(work) -> Path:
    return make_tiny_model(work / "tiny-llama", arch="llama", seed=1)


@pytest.fixture(scope="module")
def qwen_adapter(tiny_model, work) -> Path:
    return random_adapter(tiny_model, work / "adapter-qwen", system_prompt="你是甄嬛。")


# ------------------------------------------------------------------ fused ≡ base + adapter


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fused_equals_base_plus_adapter_fp32(arch, tiny_model, tiny_llama, qwen_adapter, work):
    base = tiny_model if arch == "qwen2" else tiny_llama
    adapter = (
        qwen_adapter
        if arch == "qwen2"
        else random_adapter(tiny_llama, work / "adapter-llama", seed=2)
    )
    out = fuse(str(base), adapter, work / f"fused-{arch}", dtype="float32")
    ref = _logits(base, adapter)
    delta = _max_delta(_logits(out), ref)
    print(f"\n[{arch}] fused vs base+adapter fp32: max|Δlogit| {delta:.2e}")
    assert delta <= 1e-4
    assert _max_delta(_logits(base), ref) > 1e-2  # the adapter really changes the model


def test_fuse_keeps_base_dtype_by_default(tiny_model, qwen_adapter, work):
    out = fuse(str(tiny_model), qwen_adapter, work / "fused-default")
    base_dtype = json.loads((tiny_model / "config.json").read_text())["torch_dtype"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == base_dtype
    weights = mx.load(str(out / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {f"mlx.core.{base_dtype}"}


# ------------------------------------------------------------ QLoRA: fuse into the unquantized base


@pytest.fixture(scope="module")
def qlora_run(work):
    from mlx_lora.config import TrainConfig
    from mlx_lora.train.loop import train

    base = make_tiny_model(
        work / "tiny-128",
        hidden_size=128,
        intermediate_size=256,
        layers=2,
        heads=4,
        kv_heads=2,
        seed=3,
    )
    cfg = TrainConfig(
        model=str(base),
        data=str(SAMPLE_DATA),
        output_dir=str(work / "qlora"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        max_seq_length=128,
        quantize=4,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        system_prompt="你是甄嬛。",
        save_steps=100,
        logging_steps=1,
        plot=False,
        seed=0,
    )
    train(cfg, progress=False)
    fused = fuse(None, work / "qlora", work / "qlora-fused", dtype="float32")
    return base, work / "qlora", fused


def test_qlora_fused_weights_derive_from_unquantized_base(qlora_run):
    base, adapter, fused = qlora_run
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["mlx_lora"]["quantize"] == 4
    scale = acfg["lora_alpha"] / acfg["r"]
    lora = {
        k: np.array(v.astype(mx.float32))
        for k, v in mx.load(str(adapter / "adapter_model.safetensors")).items()
    }
    base_w = {
        k: np.array(v.astype(mx.float32))
        for k, v in mx.load(str(base / "model.safetensors")).items()
    }
    fused_w = {k: np.array(v) for k, v in mx.load(str(fused / "model.safetensors")).items()}
    assert set(fused_w) == set(base_w)
    adapted = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        assert np.abs(b).max() > 0  # training moved B away from its zero init
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        w = base_w[name]
        expected = w + np.float32(scale) * (b @ a)
        np.testing.assert_allclose(fused_w[name], expected, rtol=0, atol=1e-6, err_msg=name)
        # ...and not from the 4-bit copy training ran against: that would differ by the
        # quantization error
        wq = np.array(
            mx.dequantize(*mx.quantize(mx.array(w), group_size=64, bits=4), group_size=64, bits=4)
        )
        assert np.abs((wq + np.float32(scale) * (b @ a)) - fused_w[name]).max() > 1e-3, name
        adapted += 1
    assert adapted == 2 * 7  # 2 layers × q,k,v,o,gate,up,down
    untouched = [k for k in base_w if not k.endswith("_proj.weight")]
    for k in untouched:
        np.testing.assert_array_equal(fused_w[k], base_w[k], err_msg=k)


def test_output_folder_is_a_clean_hf_folder(qlora_run):
    base, adapter, fused = qlora_run
    config = json.loads((fused / "config.json").read_text())
    assert not {"quantization", "quantization_config"} & set(config)
    assert config["torch_dtype"] == "float32"
    base_config = json.loads((base / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == {
        k: v for k, v in base_config.items() if k != "torch_dtype"
    }
    copied = [n for n in (*TOKENIZER_FILES, "generation_config.json") if (base / n).is_file()]
    assert "tokenizer_config.json" in copied and "generation_config.json" in copied
    for name in copied:
        assert (fused / name).read_bytes() == (base / name).read_bytes(), name
    assert json.loads((fused / "tokenizer_config.json").read_text())["chat_template"]
    info = json.loads((fused / "mlx_lora.json").read_text())
    assert info["system_prompt"] == "你是甄嬛。" and info["r"] == 4
    assert sorted(p.name for p in fused.glob("*.safetensors")) == ["model.safetensors"]


def test_chat_template_moved_into_tokenizer_config(tiny_model, qwen_adapter, work):
    """Current transformers keeps the template in chat_template.jinja; llama.cpp reads
    tokenizer_config.json."""
    base = work / "template-in-jinja"
    shutil.copytree(tiny_model, base)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    template = tc.pop("chat_template")
    (base / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (base / "chat_template.jinja").write_text(template)
    out = fuse(str(base), qwen_adapter, work / "fused-jinja", dtype="float32")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert (out / "chat_template.jinja").read_bytes() == (base / "chat_template.jinja").read_bytes()


def test_sharded_base_keeps_its_shards(tiny_model, qwen_adapter, work):
    base = work / "sharded"
    shutil.copytree(tiny_model, base)
    (base / "model.safetensors").unlink()
    weights = mx.load(str(tiny_model / "model.safetensors"))
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(
            str(base / fname), {k: weights[k] for k in part}, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(part, fname))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    out = fuse(str(base), qwen_adapter, work / "fused-sharded", dtype="float32")
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert (out / "model.safetensors.index.json").read_bytes() == (
        base / "model.safetensors.index.json"
    ).read_bytes()
    for fname in set(weight_map.values()):
        assert set(mx.load(str(out / fname))) == {k for k, f in weight_map.items() if f == fname}
    single = work / "fused-qwen2"
    if not single.is_dir():
        single = fuse(str(tiny_model), qwen_adapter, work / "fused-single", dtype="float32")
    assert _max_delta(_logits(out), _logits(single)) == 0.0


# ------------------------------------------------------------------ errors leave nothing behind


def test_adapter_from_another_base_is_refused(qwen_adapter, qlora_run, work):
    base128 = qlora_run[0]
    out = work / "wrong-base"
    with pytest.raises(MlxLoraError, match="another model|another base|does not fit"):
        fuse(str(base128), qwen_adapter, out)
    assert not out.exists()
    assert _no_leftovers(work) == []


def test_adapter_with_more_layers_is_refused_after_writing_started(qwen_adapter, work):
    """The 2-layer adapter's layer-1 tensors have no home in a 1-layer base: found only after the
    shard is written."""
    one_layer = make_tiny_model(work / "tiny-1layer", layers=1)
    out = work / "wrong-layers"
    with pytest.raises(MlxLoraError, match="trained on another model"):
        fuse(str(one_layer), qwen_adapter, out)
    assert not out.exists()
    assert _no_leftovers(work) == []


def test_existing_output_needs_overwrite(tiny_model, qwen_adapter, work):
    from mlx_lora.core.cli import run
    from mlx_lora.export.fuse import main

    out = work / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MlxLoraError, match="already exists.*--overwrite"):
        fuse(str(tiny_model), qwen_adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert (
        run(
            main,
            ["--model", str(tiny_model), "--adapter", str(qwen_adapter), "--output-dir", str(out)],
        )
        == 2
    )
    assert (
        run(
            main,
            [
                "--model",
                str(tiny_model),
                "--adapter",
                str(qwen_adapter),
                "--output-dir",
                str(out),
                "--overwrite",
            ],
        )
        == 0
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _no_leftovers(work) == []


def test_quantized_base_is_refused(tiny_model, qwen_adapter, work):
    base = work / "quantized-base"
    shutil.copytree(tiny_model, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlxLoraError, match="quantized.*unquantized"):
        fuse(str(base), qwen_adapter, work / "from-quantized")
    assert not (work / "from-quantized").exists()
