"""GGUF (a file or an Ollama model) as the base model: mlx_lora.model.gguf_import.

- A real quantized chat model (SmolLM2-135M-Instruct, Q4_1) imported and run in MLX gives the
  logits llama.cpp computes on the original file.
- Our own export imported back is exact: HF → GGUF f32 → HF gives identical tensors, tokenization,
  chat template and logits (a Qwen2 and a llama tiny model, the real stories260K).
- llama.cpp's tokenizer test vectors: a tokenizer rebuilt from each ggml-vocab-*.gguf, written back
  by our GGUF vocabulary code, tokenizes every text as llama.cpp's expected ids.
- Bad input: one line, exit 2, no cache folder a later run trusts (also after kill -9).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import REPO, SAMPLE_DATA, STORIES, make_tiny_model, need

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.weights import folder_tensors
from mlx_lora.gguf.writer import _llama3_rope_factors, write_gguf, write_vocab_gguf
from mlx_lora.model import gguf_import
from mlx_lora.model.gguf_import import (
    SOURCE_RECORD,
    convert_gguf,
    import_gguf,
    import_tokenizer,
    llama3_rope_scaling,
    resolve_gguf_model,
)
from mlx_lora.model.hub import resolve_model
from mlx_lora.testing.assets import smollm2_gguf, vocab_vectors

TEXTS = [
    "Hello world",
    " this is 🦙.cpp",
    "我是甄嬛，家父是大理寺少卿甄远道。",
    "Once upon a time, there was a little girl named Lily.",
    "  two  spaces\n\nnew line\t tab 3.14159 12345",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Each test converts into its own cache (and sees no real Ollama installation)."""
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    gguf_import._ANNOUNCED.clear()


@pytest.fixture(scope="session")
def ggufs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Our own exports of tiny models: f32 (lossless) and q8_0 (a quantized source)."""
    root = tmp_path_factory.mktemp("ggufs")
    llama = make_tiny_model(root / "tiny-llama", arch="llama")
    return {
        "qwen2": write_gguf(tiny_model, root / "tiny-qwen2.gguf", "f32", progress=False),
        "llama": write_gguf(llama, root / "tiny-llama.gguf", "f32", progress=False),
        "q8_0": write_gguf(tiny_model, root / "tiny-q8.gguf", "q8_0", progress=False),
        "llama_src": llama,
    }


def _mlx_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from mlx_lora.verify.checks import load_mlx, mlx_logits

    model, _ = load_mlx(folder)
    return mlx_logits(model, ids)


# ------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("which", ["qwen2", "llama", "stories"])
def test_roundtrip_of_our_export_is_exact(which, ggufs, tiny_model, tmp_path):
    from mlx_lora.model.prompt import load_hf_tokenizer

    if which == "stories":
        src = need(STORIES)
        path = write_gguf(src, tmp_path / "stories.gguf", "f32", progress=False)
    else:
        src = tiny_model if which == "qwen2" else ggufs["llama_src"]
        path = ggufs[which]
    out = tmp_path / "imported"
    record = convert_gguf(path, out)
    assert record["quantization"] is None
    a, b = folder_tensors(src), folder_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name  # bf16 stays bf16, f32 stays f32
        assert np.array_equal(a[name].f32(), b[name].f32()), name
    ta, tb = load_hf_tokenizer(src), load_hf_tokenizer(out)
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text), text
    assert ta.chat_template == tb.chat_template
    if ta.chat_template:
        msgs = [{"role": "user", "content": "你是谁？"}]
        assert ta.apply_chat_template(msgs, tokenize=False) == tb.apply_chat_template(
            msgs, tokenize=False
        )
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (src, out))
    for key in ("architectures", "hidden_size", "num_key_value_heads", "rms_norm_eps"):
        assert ca[key] == cb[key], key
    assert cb["tie_word_embeddings"] == ca.get("tie_word_embeddings", False)
    ids = ta.encode(TEXTS[3])
    assert np.array_equal(_mlx_logits(src, ids), _mlx_logits(out, ids))


@pytest.mark.parametrize("which", ["qwen2", "stories"])
def test_rebuilt_tokenizer_matches_llama_cpp(which, ggufs, tmp_path):
    """Without the embedded tokenizer.json the vocabulary is rebuilt from tokenizer.ggml.*: it
    tokenizes as llama.cpp does on the same GGUF (SentencePiece: a prefix space even before a
    leading space, unlike HF's Metaspace)."""
    from mlx_lora.gguf.llamacpp import open_llama
    from mlx_lora.model.gguf_tokenizer import build_tokenizer
    from mlx_lora.model.prompt import load_hf_tokenizer

    path = ggufs["qwen2"] if which == "qwen2" else None
    if path is None:
        path = write_gguf(need(STORIES), tmp_path / "s.gguf", "f32", progress=False)
    meta = gguf_import.metadata(gguf_import.open_gguf(path))
    assert gguf.Keys.Tokenizer.HF_JSON in meta
    del meta[gguf.Keys.Tokenizer.HF_JSON]
    tok_json, tok_config = build_tokenizer(meta, str(path))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(tok_json))
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tok = load_hf_tokenizer(tmp_path / "t")
    llm = open_llama(path, vocab_only=True)
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False)
        theirs = list(llm.tokenize(text.encode(), add_bos=False, special=True))
        assert ours == theirs, text


def test_llama3_rope_scaling_inverts_rope_freqs():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    factors = _llama3_rope_factors(rope, 64)
    back = llama3_rope_scaling(factors, 64, 500000.0)
    assert back["factor"] == 32.0
    again = _llama3_rope_factors({**back, "rope_theta": 500000.0}, 64)
    np.testing.assert_allclose(again, factors, rtol=1e-5)


# (llama.cpp's file type, its main tensor type, bound on |imported - original| / rms(original))
QUANTS = [
    ("F16", "F16", 1e-3),
    ("BF16", "BF16", 1e-2),
    ("Q8_0", "Q8_0", 0.02),
    ("Q5_0", "Q5_0", 0.1),
    ("Q5_1", "Q5_1", 0.1),
    ("Q4_0", "Q4_0", 0.2),
    ("Q4_1", "Q4_1", 0.2),
    ("Q6_K", "Q6_K", 0.05),
    ("Q5_K_M", "Q5_K", 0.1),
    ("Q4_K_M", "Q4_K", 0.2),
]


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory) -> tuple[Path, Path]:
    """A llama model wide enough for K-quants (rows of 256), and its f32 GGUF."""
    root = tmp_path_factory.mktemp("wide")
    src = make_tiny_model(
        root / "hf", arch="llama", hidden_size=256, intermediate_size=512, heads=4, layers=1
    )
    return src, write_gguf(src, root / "f32.gguf", "f32", progress=False)


@pytest.mark.parametrize("ftype,main_type,bound", QUANTS)
def test_quantized_files_dequantize_to_the_original(ftype, main_type, bound, wide_llama, tmp_path):
    """llama.cpp quantizes our f32 export; the import is the original up to quantization error
    (a wrong block layout, name or q/k row order would be off by the size of the weights)."""
    import llama_cpp

    from mlx_lora.gguf.llamacpp import quiet_stderr

    src, f32 = wide_llama
    path = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params)
    assert rc == 0
    record = convert_gguf(path, tmp_path / "hf")
    assert main_type in record["tensor_types"], record
    quantized = main_type not in ("F16", "BF16")
    assert record["quantization"] == (ftype if quantized else None)
    a, b = folder_tensors(src), folder_tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name].f32(), b[name].f32()
        rms = float(np.sqrt(np.mean(x**2)))
        assert float(np.abs(x - y).max()) <= bound * max(rms, 1e-6) * 8, name
        assert float(np.sqrt(np.mean((x - y) ** 2))) <= bound * rms, name


# ------------------------------------------------------------------------------- a real model


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """(the original Q4_1 GGUF, its imported folder)."""
    src = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert_gguf(src, out)
    return src, out


STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
    "with her friends. One day, she found a shiny red ball under a big tree. She picked it up and "
    "ran to show her mother. Her mother smiled and said that they should find the owner of the "
    "ball. They walked around the park and asked everyone they met, and at last a small boy "
    "jumped up and down with joy when he saw it."
)


@pytest.mark.slow
def test_smollm2_logits_match_llama_cpp(smollm2):
    """The imported Q4_1 model in MLX (bf16 weights, fp32 compute) vs llama.cpp on the file."""
    from mlx_lora.gguf.llamacpp import llama_logits, open_llama
    from mlx_lora.model.load import load_base
    from mlx_lora.verify.checks import compare_logits, load_mlx, mlx_logits

    src, folder = smollm2
    record = json.loads((folder / SOURCE_RECORD).read_text())
    assert record["quantization"] == "Q4_1" and record["dtype"] == "bfloat16"
    _, tok, config = load_base(folder)  # mlx-lm loads the folder as it is
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    model, tok = load_mlx(folder)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    texts = [prompt + "The capital of France is Paris, on the Seine.", STORY, STORY.upper()]
    llm = open_llama(src, n_ctx=512)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    for t, i in zip(texts, ids, strict=True):  # the rebuilt tokenizer is llama.cpp's
        assert i == list(llm.tokenize(t.encode(), add_bos=False, special=True))
    ref = [llama_logits(llm, i) for i in ids]
    got = [mlx_logits(model, i) for i in ids]
    c = compare_logits(ref, got, "q4_1")
    print(f"SmolLM2 Q4_1 imported vs llama.cpp: {c.figures()}")
    assert c.positions >= 200
    assert c.top1_equal >= 0.95 * c.positions, c.figures()


@pytest.mark.slow
def test_smollm2_chat_template_and_end_tokens(smollm2):
    from mlx_lora.model.prompt import load_hf_tokenizer

    src, folder = smollm2
    meta = gguf_import.metadata(gguf_import.open_gguf(src))
    tok = load_hf_tokenizer(folder)
    assert tok.chat_template == meta["tokenizer.chat_template"]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos false
    gen = json.loads((folder / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen["eos_token_id"]
    # exporting the import names the pre-tokenizer as the source did ("smollm", not "starcoder")
    from mlx_lora.gguf.vocab import read_vocab

    assert read_vocab(folder).pre == meta["tokenizer.ggml.pre"] == "smollm"


# ------------------------------------------------------------------------- tokenizer vectors


def _vectors(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 format: texts separated by a ``__ggml_vocab_test__`` line,
    one line of expected ids per text."""
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


FAMILIES = [
    "qwen2",
    "qwen35",
    "llama-bpe",
    "llama-spm",
    "phi-3",
    "gpt-2",
    "gemma-4",
    "deepseek-coder",
    "starcoder",
    "refact",
    "mpt",
]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_vectors_through_our_gguf(family, tmp_path):
    from mlx_lora.gguf.llamacpp import open_llama
    from mlx_lora.model.prompt import load_hf_tokenizer

    vectors = vocab_vectors()
    if family not in vectors:
        pytest.skip(f"no ggml-vocab-{family}.gguf in this llama.cpp")
    vocab, inp, out = vectors[family]
    cases = _vectors(inp, out)
    hf_dir = import_tokenizer(vocab, tmp_path / "tok")
    ours = write_vocab_gguf(hf_dir, tmp_path / "ours.gguf")
    llm = open_llama(ours, vocab_only=True)
    cpp = [t for t, ids in cases if list(llm.tokenize(t.encode(), False, False)) != ids]
    tok = load_hf_tokenizer(hf_dir)
    hf = [t for t, ids in cases if tok.encode(t, add_special_tokens=False) != ids]
    print(
        f"{family}: llama.cpp on our GGUF {len(cases) - len(cpp)}/{len(cases)}, "
        f"rebuilt HF tokenizer {len(cases) - len(hf)}/{len(cases)}"
    )
    assert not cpp, cpp[:3]
    assert not hf, hf[:3]


@pytest.mark.parametrize("family", ["bert-bge", "falcon"])
def test_unsupported_vocabularies_are_one_line_errors(family, tmp_path):
    vectors = vocab_vectors()
    if family not in vectors:
        pytest.skip(f"no ggml-vocab-{family}.gguf in this llama.cpp")
    with pytest.raises(MlxLoraError, match="not supported") as e:
        import_tokenizer(vectors[family][0], tmp_path / "tok")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- cache, hub


def test_cache_is_reused_and_keyed_by_content(ggufs, tmp_path, monkeypatch):
    folder = resolve_model(str(ggufs["qwen2"]))
    assert (folder / SOURCE_RECORD).is_file()
    assert folder.parent == tmp_path / "cache" / "gguf"
    copy = shutil.copy(ggufs["qwen2"], tmp_path / "renamed.gguf")  # same content, same folder
    monkeypatch.setattr(gguf_import, "convert_gguf", lambda *a, **k: pytest.fail("reconverted"))
    assert resolve_model(str(copy)) == folder
    hashed = gguf_import.hashlib.file_digest
    monkeypatch.setattr(gguf_import.hashlib, "file_digest", lambda *a: pytest.fail("rehashed"))
    assert resolve_model(str(copy)) == folder  # the hash is remembered per path, size and mtime
    monkeypatch.setattr(gguf_import.hashlib, "file_digest", hashed)


def test_quantized_source_is_said_once(ggufs, capsys):
    folder = resolve_gguf_model(str(ggufs["q8_0"]))
    resolve_gguf_model(str(ggufs["q8_0"]))
    err = capsys.readouterr().err
    assert err.count("weights dequantized from Q8_0: the fine-tune starts from the quantized") == 1
    assert json.loads((folder / SOURCE_RECORD).read_text())["dtype"] == "bfloat16"
    resolve_gguf_model(str(ggufs["qwen2"]))  # a float source says nothing
    assert "dequantized" not in capsys.readouterr().err


def _fake_ollama(root: Path, name: str, tag: str, gguf_file: Path) -> str:
    digest = gguf_import.file_sha256(gguf_file)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf_file, root / "blobs" / f"sha256-{digest}")
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return digest


def test_ollama_names_resolve_to_the_blob(ggufs, tmp_path, monkeypatch):
    root = tmp_path / "ollama-models"
    digest = _fake_ollama(root, "tiny", "latest", ggufs["qwen2"])
    _fake_ollama(root, "tiny", "q8", ggufs["q8_0"])
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    folder = resolve_model("ollama:tiny")
    assert folder.name.startswith(digest[:32])
    assert resolve_model("ollama:tiny:latest") == folder
    assert resolve_model("ollama:library/TINY:latest") == folder
    assert resolve_model("ollama:tiny:q8") != folder
    with pytest.raises(MlxLoraError, match=r"installed: tiny:latest, tiny:q8\)") as e:
        resolve_model("ollama:qwen2.5:0.5b")
    assert "ollama pull qwen2.5:0.5b" in str(e.value)


# ------------------------------------------------------------------------------- bad input


def _write_gguf_meta(path: Path, arch: str, **kv) -> Path:
    """A GGUF with metadata only (no tensors), enough to fail the checks before weights."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def _tensor_type_offset(path: Path) -> int:
    """Byte offset of the first tensor's type field in the tensor-info table."""
    t = gguf.GGUFReader(path).tensors[0]
    return int(t.field.offset) + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)


def _bad_files(ggufs, root: Path) -> dict[str, tuple[Path, str]]:
    good = ggufs["qwen2"].read_bytes()
    files = {
        "header": (root / "header.gguf", "not a readable GGUF"),
        "data": (root / "data.gguf", "truncated"),
        "quant": (root / "quant.gguf", "unknown quantization type"),
        "arch": (root / "arch.gguf", "architecture 'gemma3' is not supported"),
        "notok": (root / "notok.gguf", "has no tokenizer"),
        "empty": (root / "empty.gguf", "not a readable GGUF"),
    }
    files["header"][0].write_bytes(good[:200])
    files["data"][0].write_bytes(good[: len(good) - 4096])
    bad = bytearray(good)
    at = _tensor_type_offset(ggufs["qwen2"])
    bad[at : at + 4] = struct.pack("<I", 250)
    files["quant"][0].write_bytes(bytes(bad))
    _write_gguf_meta(files["arch"][0], "gemma3")
    _write_gguf_meta(files["notok"][0], "llama")
    files["empty"][0].write_bytes(b"")
    return files


def test_bad_gguf_files_are_one_line_errors_and_leave_no_folder(ggufs, tmp_path):
    for kind, (path, needle) in _bad_files(ggufs, tmp_path).items():
        with pytest.raises(MlxLoraError) as e:
            resolve_model(str(path))
        msg = str(e.value)
        assert needle in msg and str(path) in msg and "\n" not in msg, (kind, msg)
    cache = tmp_path / "cache" / "gguf"
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no folder, no temporary


def test_ollama_missing_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(MlxLoraError, match="no Ollama models folder at .*OLLAMA_MODELS"):
        resolve_model("ollama:qwen2.5")
    (tmp_path / "no-ollama" / "manifests").mkdir(parents=True)
    with pytest.raises(MlxLoraError, match=r"not installed .*\(installed: none\)"):
        resolve_model("ollama:qwen2.5")


def test_cli_error_for_a_bad_gguf(ggufs, tmp_path):
    path, needle = _bad_files(ggufs, tmp_path)["data"]
    env = {**os.environ, "MLX_LORA_NO_OPENBLAS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.chat", "--model", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and needle in r.stderr


@pytest.mark.slow
def test_kill_during_conversion_leaves_nothing_trusted(tmp_path):
    src = smollm2_gguf()
    env = {**os.environ, "MLX_LORA_CACHE": str(tmp_path / "cache")}
    code = f"from mlx_lora.model.gguf_import import import_gguf; import_gguf({str(src)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    cache = tmp_path / "cache" / "gguf"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        partial = list(cache.glob(".*.tmp-*/.model.tmp-*.safetensors")) if cache.is_dir() else []
        if partial and partial[0].stat().st_size > 10_000_000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folder = import_gguf(src, progress=False)  # a later run converts afresh and tidies up
    assert (folder / SOURCE_RECORD).is_file()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]


# ------------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_train_then_chat_on_a_gguf_base(ggufs, tmp_path):
    """train --model x.gguf records the GGUF as the base; chat --adapter finds it again."""
    from mlx_lora.config import TrainConfig
    from mlx_lora.train.loop import train

    out = tmp_path / "run"
    cfg = TrainConfig(
        model=str(ggufs["q8_0"]),
        data=str(SAMPLE_DATA),
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_seq_length=128,
        plot=False,
    )
    train(cfg)
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(ggufs["q8_0"])
    env = {**os.environ, "MLX_LORA_NO_OPENBLAS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.chat", "--adapter", str(out), "--prompt", "你是谁？"]
        + ["--max-tokens", "5", "--temperature", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "weights dequantized from Q8_0" in r.stderr
