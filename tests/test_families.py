"""Model families of 2026: every architecture mlx_lora writes as GGUF, proven on tiny models.

For each family a tiny random model from ``mlx_lora.testing.tiny_model --arch`` (the family's HF
config, weight names and tokenizer kind) is written to GGUF by :mod:`mlx_lora.gguf.writer` and run
by
llama.cpp (llama-cpp-python): its logits must equal mlx-lm's plain forward pass in fp32. The
families whose llama.cpp graph uses GELU (Gemma) are held to a bound that includes ggml's f16 GELU
table, and the same models with their MLP switched off (``down_proj`` zero) to 1e-4, which shows
that everything but that table agrees. ``python -m mlx_lora.export … --gguf-type f32 --verify``
(full and adapter mode) must pass for each family. Other architectures are refused with one line
that names llama.cpp's converter on the fused folder, which is still written.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import REPO, make_tiny_model

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.gguf.writer import write_gguf
from mlx_lora.testing.adapter import random_adapter
from mlx_lora.verify.checks import GELU_TABLE_ARCHS, PROBES, TOLERANCES

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")

# --arch → (GGUF architecture, LoRA targets of a typical adapter)
GGUF_FAMILIES = {
    "qwen2": ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
    "qwen3": ("qwen3", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
    "llama": ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    "mistral": ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
    "smollm": ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")),
    "gemma2": ("gemma2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
    "gemma3_text": ("gemma3", ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    "phi3": ("phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}
OTHER_ARCHS = (
    "olmo2",
    "granite",
    "starcoder2",
)  # mlx-lm trains them; GGUF via llama.cpp's converter


# Ollama TEMPLATEs for chat formats mlx_lora.ollama.modelfile does not derive (yet).
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def built(work) -> dict:
    """Tiny models, built once per module and arch (fan_in init: activations of unit size, so
    every tensor visibly matters for the logits)."""
    cache: dict = {}

    def get(arch: str, **kw) -> Path:
        key = (arch, json.dumps(kw, sort_keys=True))
        if key not in cache:
            name = f"{arch}-{len(cache)}"
            cache[key] = make_tiny_model(work / name, arch=arch, init="fan_in", **kw)
        return cache[key]

    return get


def _mlx(path: Path):
    import mlx.core as mx

    from mlx_lora.model.load import load_base

    model, tok, _ = load_base(path, dtype=mx.float32)
    return model, tok


def _mlx_logits(model, ids: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _llama_logits(path: Path, ids: list[int], n_ctx: int = 256) -> np.ndarray:
    from mlx_lora.gguf.llamacpp import llama_logits, open_llama

    return llama_logits(open_llama(path, n_ctx=n_ctx), ids)


def _probe_ids(tok) -> list[list[int]]:
    from mlx_lora.model.prompt import build_prompt

    return [build_prompt(tok, list(p)) for p in PROBES]


def _compare(hf_dir: Path, gguf_path: Path, n_ctx: int = 256) -> tuple[float, int, int, float]:
    """max|Δlogit|, top-1 agreements, positions, max|logit| over the three probe chats."""
    model, tok = _mlx(hf_dir)
    worst, same, total, scale = 0.0, 0, 0, 0.0
    for ids in _probe_ids(tok):
        a, b = _mlx_logits(model, ids), _llama_logits(gguf_path, ids, n_ctx)
        worst = max(worst, float(np.abs(a - b).max()))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        scale = max(scale, float(np.abs(a).max()))
    return worst, same, total, scale


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


# ------------------------------------------------------------------ every --arch loads


@pytest.mark.parametrize("arch", [*GGUF_FAMILIES, *OTHER_ARCHS])
def test_tiny_model_loads_in_mlx_lm_and_transformers(arch, built):
    """The config is one transformers and mlx-lm both read; the chat template renders."""
    import mlx.core as mx
    from transformers import AutoConfig

    path = built(arch)
    cfg = json.loads((path / "config.json").read_text())
    hf_cfg = AutoConfig.from_pretrained(str(path))
    assert hf_cfg.model_type == cfg["model_type"]
    model, tok = _mlx(path)
    ids = _probe_ids(tok)[2]
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), cfg["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)).item())
    gen = json.loads((path / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) <= set(tok.eos_token_ids)
    text = tok.decode(ids)
    assert "小主，今天天气如何？" in text and "回禀小主" in text


def test_family_weights_follow_hf_layouts(built):
    """Gemma's norms are stored as offsets around 0 (weight 1 + w); Phi-3's projections fused."""
    import mlx.core as mx

    g = mx.load(str(built("gemma3_text") / "model.safetensors"))
    assert abs(float(g["model.layers.0.pre_feedforward_layernorm.weight"].mean())) < 0.1
    assert g["model.layers.0.self_attn.q_norm.weight"].shape == (32,)  # per head
    p = mx.load(str(built("phi3") / "model.safetensors"))
    assert p["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert p["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    o = mx.load(str(built("olmo2") / "model.safetensors"))
    assert o["model.layers.0.self_attn.k_norm.weight"].shape == (2 * 16,)  # whole k
    assert "model.layers.0.input_layernorm.weight" not in o


# ------------------------------------------------------------------ llama.cpp vs MLX


@needs_llama_cpp
@pytest.mark.parametrize("arch", list(GGUF_FAMILIES))
def test_gguf_f32_logits_equal_mlx(arch, built, work):
    path = built(arch)
    out = write_gguf(path, work / f"{arch}-f32.gguf", "f32", progress=False)
    family = GGUF_FAMILIES[arch][0]
    assert _field(gguf.GGUFReader(out), "general.architecture") == family
    worst, same, total, scale = _compare(path, out)
    print(f"\n[{arch}] max|Δlogit| {worst:.2e}, top-1 {same}/{total}, max|logit| {scale:.1f}")
    assert same == total
    if family in GELU_TABLE_ARCHS:  # ggml's f16 GELU table; see the MLP-off test below
        floor, fraction = TOLERANCES["f32-gelu"]
        assert worst <= floor + fraction * scale
    else:
        assert worst <= 1e-4


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_without_gelu_equal_to_1e_4(arch, built, work):
    """With the MLP's output zeroed the GELU table no longer matters: all the rest (norm offsets,
    soft-capping, windows, rope bases, q/k norms, scaling) agrees to 1e-4."""
    import mlx.core as mx

    folder = work / f"{arch}-no-mlp"
    shutil.copytree(built(arch), folder)
    weights = mx.load(str(folder / "model.safetensors"))
    for k in weights:
        if k.endswith("down_proj.weight"):
            weights[k] = mx.zeros_like(weights[k])
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    out = write_gguf(folder, work / f"{arch}-no-mlp.gguf", "f32", progress=False)
    worst, same, total, _ = _compare(folder, out)
    print(f"\n[{arch} without MLP] max|Δlogit| {worst:.2e}, top-1 {same}/{total}")
    assert worst <= 1e-4 and same == total


@needs_llama_cpp
def test_gemma2_soft_capping_bites_and_matches(built, work):
    """Small caps change the logits a lot in both implementations, identically."""
    capped = built("gemma2", config_overrides={"attn_logit_softcapping": 1.0,
                                               "final_logit_softcapping": 2.0})  # fmt: skip
    out = write_gguf(capped, work / "gemma2-capped.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(out)
    assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(1.0)
    assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(2.0)
    worst, same, total, scale = _compare(capped, out)
    assert scale <= 2.0 and same == total and worst <= TOLERANCES["f32-gelu"][0] * 2
    model, tok = _mlx(built("gemma2"))
    ids = _probe_ids(tok)[0]
    loose = _mlx_logits(model, ids)
    assert np.abs(loose - _mlx_logits(_mlx(capped)[0], ids)).max() > 0.5


@needs_llama_cpp
def test_phi3_longrope(built, work):
    """LongRoPE: factor tensors and attention factor as llama.cpp reads them; mlx-lm applies the
    long factors at every length, llama.cpp above the original context (verify runs it there)."""
    from mlx_lora.verify.checks import verify_gguf

    rng = np.random.default_rng(1)
    rope = {
        "type": "longrope",
        "long_factor": [float(x) for x in 1 + 3 * rng.random(8)],
        "short_factor": [float(x) for x in 1 + 0.2 * rng.random(8)],
    }
    overrides = {"rope_scaling": rope, "max_position_embeddings": 131072}
    path = built("phi3", config_overrides=overrides)
    out = write_gguf(path, work / "phi3-longrope.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for kind in ("long", "short"):
        want = np.float32(rope[f"{kind}_factor"])
        np.testing.assert_array_equal(tensors[f"rope_factors_{kind}.weight"], want)
    assert _field(reader, "phi3.rope.scaling.original_context_length") == 4096
    assert _field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(
        np.sqrt(1 + np.log(32) / np.log(4096)), rel=1e-6
    )
    worst, same, total, _ = _compare(path, out, n_ctx=4097)
    assert worst <= 1e-4 and same == total
    report = verify_gguf(path, out, greedy_tokens=8)
    assert report.ok and any("LongRoPE" in n for n in report.notes), report.table()


# ------------------------------------------------------------------ metadata


@pytest.mark.parametrize("arch", list(GGUF_FAMILIES))
def test_gguf_metadata_per_family(arch, built, work):
    path = built(arch)
    cfg = json.loads((path / "config.json").read_text())
    out = write_gguf(path, work / f"{arch}-meta.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(out)
    fam = GGUF_FAMILIES[arch][0]
    f = {k: _field(reader, k) for k in reader.fields}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f[f"{fam}.rope.dimension_count"] == head_dim
    if cfg.get("head_dim"):
        assert f[f"{fam}.attention.key_length"] == f[f"{fam}.attention.value_length"] == head_dim
    names = {t.name: t for t in reader.tensors}
    assert ("output.weight" in names) == (not cfg["tie_word_embeddings"])
    if arch == "gemma2":
        assert f["gemma2.attention.sliding_window"] == 4096
        assert f["gemma2.attention.sliding_window_pattern"] == [True, False]
    if arch == "gemma3_text":
        assert f["gemma3.rope.freq_base"] == 1e6 and f["gemma3.rope.freq_base_swa"] == 1e4
        assert f["gemma3.rope.scaling.type"] == "linear" and f["gemma3.rope.scaling.factor"] == 8
        assert f["gemma3.attention.sliding_window"] == 16
        assert f["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert "gemma3.attn_logit_softcapping" not in f
    if arch == "phi3":
        assert names["blk.0.attn_qkv.weight"].shape.tolist() == [64, (4 + 2 * 2) * 16]
        assert names["blk.0.ffn_up.weight"].shape.tolist() == [64, 2 * 128]
        assert f["phi3.rope.scaling.original_context_length"] == 4096
    if arch == "qwen3":
        assert names["blk.0.attn_q_norm.weight"].shape.tolist() == [32]


def test_gemma_norms_are_written_with_their_offset(built, work):
    """GGUF norm = 1 + HF weight, for every norm including q/k; matrices unchanged."""
    import mlx.core as mx

    path = built("gemma3_text")
    weights = mx.load(str(path / "model.safetensors"))
    hf = {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    out = write_gguf(path, work / "gemma3-norms.gguf", "f32", progress=False)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    pairs = {
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(got[ours], hf[theirs] + 1.0, rtol=0, atol=1e-7, err_msg=ours)
    np.testing.assert_array_equal(
        got["blk.0.attn_q.weight"].reshape(hf["model.layers.0.self_attn.q_proj.weight"].shape),
        hf["model.layers.0.self_attn.q_proj.weight"],
    )


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "arch,overrides,match",
    [
        ("gemma2", {"query_pre_attn_scalar": 144}, r"query_pre_attn_scalar is 144 .*1/sqrt\(32\)"),
        ("gemma2", {"final_logit_softcapping": None}, "final_logit_softcapping is null"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "no attention soft-capping"),
        ("qwen3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused(arch, overrides, match, built, work):
    path = built(arch, config_overrides=overrides)
    out = work / f"refused-{arch}.gguf"
    with pytest.raises(MlxLoraError, match=match):
        write_gguf(path, out, "f32", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_other_architecture_names_the_converter(arch, built, work):
    path = built(arch)
    hint = re.escape(f"convert_hf_to_gguf.py {path}")
    with pytest.raises(MlxLoraError, match=rf"{arch.title()}ForCausalLM.*{hint}"):
        write_gguf(path, work / f"{arch}.gguf", "f16", progress=False)


def test_export_of_other_architecture_writes_fused_folder_and_names_converter(built, work):
    """The fused folder is written (a complete HF model); the one error line names llama.cpp's
    converter on it; nothing else is left."""
    base = built("olmo2")
    adapter = random_adapter(base, work / "olmo2-adapter", targets=("q_proj", "v_proj"))
    out = work / "olmo2-export"
    cmd = [sys.executable, "-m", "mlx_lora.export", "--model", str(base), "--adapter"]
    cmd += [str(adapter), "--output-dir", str(out), "--name", "olmo"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"convert_hf_to_gguf.py {out / 'olmo-hf'}" in error[0]
    assert sorted(p.name for p in out.iterdir()) == ["olmo-hf"]
    assert (out / "olmo-hf" / "model.safetensors").is_file()
    r = subprocess.run([*cmd, "--mode", "adapter"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "convert_lora_to_gguf.py" in r.stderr


# ------------------------------------------------------------------ export --verify


def _export_cmd(arch: str, base: Path, adapter: Path, out: Path, mode: str, work: Path) -> list:
    cmd = [sys.executable, "-m", "mlx_lora.export", "--model", str(base), "--adapter"]
    cmd += [str(adapter), "--output-dir", str(out), "--mode", mode]
    cmd += ["--gguf-type", "f32", "--verify"]  # the TEMPLATE derived from the chat template
    return cmd


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("mode", ["full", "adapter"])
@pytest.mark.parametrize("arch", [a for a in GGUF_FAMILIES if a not in ("qwen2", "llama")])
def test_export_f32_verify_exits_0(arch, mode, built, work):
    """``python -m mlx_lora.export --model <tiny> --adapter … --gguf-type f32 --verify`` passes,
    with LoRA on every kind of projection the family has (Phi-3: the fused ones)."""
    base = built(arch)
    targets = GGUF_FAMILIES[arch][1]
    adapter = random_adapter(base, work / f"{arch}-{mode}-adapter", targets=targets)
    out = work / f"{arch}-{mode}-export"
    r = subprocess.run(
        _export_cmd(arch, base, adapter, out, mode, work),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    print(r.stdout[r.stdout.find("verify ") :].split("artifacts:")[0])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "result: all checks passed" in r.stdout
    manifest = json.loads((out / "export.json").read_text())
    if mode == "adapter":
        lora = gguf.GGUFReader(out / manifest["lora_gguf"])
        names = {t.name for t in lora.tensors}
        if arch == "phi3":  # LoRA on the fused projections maps onto llama.cpp's fused tensors
            assert {"blk.0.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= names
        assert len(names) == 2 * 2 * len(targets)


@needs_llama_cpp
def test_phi3_special_tokens_strip_like_hf_under_any_name(built, work):
    """llama.cpp strips the whitespace after Phi-3's special tokens (HF's rstrip) only when
    general.name says phi3; the writer makes sure it does, so Ollama tokenizes the rendered chat
    exactly as training did."""
    from mlx_lora.gguf.llamacpp import llama_tokenize, open_llama
    from mlx_lora.model.prompt import encode_text, load_hf_tokenizer, render

    path = built("phi3")
    tok = load_hf_tokenizer(path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = render(tok, chat, add_generation_prompt=True)
    assert "<|user|>\nHi there<|end|>\n" in text
    out = write_gguf(path, work / "phi3-named.gguf", "f32", progress=False, name="huanhuan")
    assert _field(gguf.GGUFReader(out), "general.name") == "huanhuan (phi3)"
    llm = open_llama(out, vocab_only=True)
    assert llama_tokenize(llm, text) == encode_text(tok, text)
    qwen = write_gguf(built("qwen3"), work / "qwen3-named.gguf", "f32", progress=False, name="hh")
    assert _field(gguf.GGUFReader(qwen), "general.name") == "hh"
