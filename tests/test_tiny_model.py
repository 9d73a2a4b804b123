"""mlx_lora.testing.tiny_model builds checkpoints every other test relies on; check they are real.

Each model is built once per module (a second or two each) and loaded through the same code paths
the package uses: mlx_lm.utils.load and transformers.AutoTokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.testing import tiny_model as mtm

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_TOK = SHARED / "fixtures" / "qwen15-tokenizer"

needs_qwen = pytest.mark.skipif(
    not (QWEN_TOK / "vocab.json").is_file(), reason="../shared/fixtures/qwen15-tokenizer absent"
)


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return mtm.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def tiny_qwen_tok(tmp_path_factory) -> Path:
    if not (QWEN_TOK / "vocab.json").is_file():
        pytest.skip("../shared/fixtures/qwen15-tokenizer absent")
    return mtm.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen", tokenizer=QWEN_TOK)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return mtm.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", arch="llama")


CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}],
    [
        {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
        {"role": "user", "content": "你好"},
    ],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "皇上万福。"},
        {"role": "user", "content": "朕今日有些乏了。"},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "1 + 1 = ?"},
        {"role": "assistant", "content": "2"},
    ],
]


# ---------------------------------------------------------------- trained tokenizer, qwen2


def test_loads_in_mlx_lm_and_forward_shape(tiny: Path) -> None:
    from mlx_lm.utils import load

    model, tok = load(str(tiny))
    cfg = _read_json(tiny / "config.json")
    ids = tok.encode("皇上万福，Hello world 123")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), cfg["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits.astype(mx.float32))).item())
    gen = _read_json(tiny / "generation_config.json")
    assert set(tok.eos_token_ids) == set(gen["eos_token_id"])


def test_config_files(tiny: Path) -> None:
    cfg = _read_json(tiny / "config.json")
    gen = _read_json(tiny / "generation_config.json")
    tok = _auto_tokenizer(tiny)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 32768 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["vocab_size"] >= len(tok) and cfg["vocab_size"] % 128 == 0
    assert cfg["eos_token_id"] == im_end and cfg["bos_token_id"] == eot
    assert gen["eos_token_id"] == [im_end, eot]
    assert gen["pad_token_id"] == eot and gen["bos_token_id"] == eot
    assert gen["do_sample"] is True and gen["top_p"] == 0.8 and gen["top_k"] == 20


def test_weights_bf16_hf_names_and_init(tiny: Path) -> None:
    weights, meta = mx.load(str(tiny / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "pt"}
    assert all(w.dtype == mx.bfloat16 for w in weights.values())
    cfg = _read_json(tiny / "config.json")
    assert weights["model.embed_tokens.weight"].shape == (cfg["vocab_size"], 64)
    assert "lm_head.weight" not in weights  # tied
    for i in range(2):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v"):
            bias = weights[p + f"self_attn.{proj}_proj.bias"]
            assert float(mx.abs(bias.astype(mx.float32)).max().item()) > 0
        assert p + "self_attn.o_proj.bias" not in weights
        assert weights[p + "self_attn.k_proj.weight"].shape == (2 * 16, 64)  # kv heads * head dim
        assert weights[p + "mlp.gate_proj.weight"].shape == (128, 64)
        assert mx.array_equal(weights[p + "input_layernorm.weight"], mx.ones((64,)))
    emb = weights["model.embed_tokens.weight"].astype(mx.float32)
    assert 0.11 < float(mx.std(emb).item()) < 0.14  # 1/sqrt(64): unit-norm rows


def test_special_tokens_single_ids(tiny: Path) -> None:
    tok = _auto_tokenizer(tiny)
    ids = [tok.encode(t, add_special_tokens=False) for t in mtm.SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 3
    assert set(mtm.SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None


def test_trained_tokenizer_same_ids_everywhere(tiny: Path) -> None:
    """tokenizer.json, transformers and mlx-lm must agree, or MLX and GGUF parity breaks."""
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    hf = _auto_tokenizer(tiny)
    wrapped = load_mlx_tokenizer(tiny)
    for text in [
        "你好，我是甄嬛。",
        "Hello world 2024 don't  stop\n\n  ok",
        "<|im_start|>user\n你是谁？<|im_end|>\n",
        "emoji 🙂 and ünïcödé",
    ]:
        ids = raw.encode(text).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert wrapped.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text
    # Qwen's pre-tokenizer splits numbers into single digits
    one, two = (hf.encode(d, add_special_tokens=False) for d in "12")
    assert hf.encode("12", add_special_tokens=False) == one + two


@needs_qwen
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_renders_like_qwen(tiny: Path, gen_prompt: bool) -> None:
    ours, qwen = _auto_tokenizer(tiny), _auto_tokenizer(QWEN_TOK)
    for conv in CONVERSATIONS:
        a = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
        b = qwen.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
        assert a == b
    first = ours.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert first == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_stored_in_tokenizer_config(tiny: Path) -> None:
    tc = _read_json(tiny / "tokenizer_config.json")
    assert tc["chat_template"] == mtm.CHATML_TEMPLATE
    assert tc["tokenizer_class"] == "Qwen2Tokenizer"
    assert {v["content"] for v in tc["added_tokens_decoder"].values()} == set(mtm.SPECIAL_TOKENS)
    assert not (tiny / "chat_template.jinja").exists()


# ---------------------------------------------------------------- real Qwen tokenizer


def test_qwen_tokenizer_copied_byte_for_byte(tiny_qwen_tok: Path) -> None:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_qwen_tok / name).read_bytes() == (QWEN_TOK / name).read_bytes()
    assert not (tiny_qwen_tok / "README.md").exists()
    assert not (tiny_qwen_tok / "config.Qwen1.5-0.5B-Chat.json").exists()
    cfg = _read_json(tiny_qwen_tok / "config.json")
    gen = _read_json(tiny_qwen_tok / "generation_config.json")
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 151936
    assert cfg["eos_token_id"] == 151645 and cfg["bos_token_id"] == 151643
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_qwen_tokenizer_model_loads_in_mlx_lm(tiny_qwen_tok: Path) -> None:
    from mlx_lm.utils import load

    model, tok = load(str(tiny_qwen_tok))
    ids = tok.encode("你好")
    assert ids == [108386]
    assert set(tok.eos_token_ids) == {151645, 151643}
    logits = model(mx.array([[151644, 872, 198, 108386, 151645]]))
    assert logits.shape == (1, 5, 151936)


# ---------------------------------------------------------------- llama variant


def test_llama_variant_loads_with_untied_head(tiny_llama: Path) -> None:
    from mlx_lm.utils import load

    cfg = _read_json(tiny_llama / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is False
    weights = mx.load(str(tiny_llama / "model.safetensors"))
    assert weights["lm_head.weight"].shape == (cfg["vocab_size"], 64)
    assert not any(k.endswith(".bias") for k in weights)
    model, tok = load(str(tiny_llama))
    ids = tok.encode("朕今日有些乏了。")
    assert model(mx.array([ids])).shape == (1, len(ids), cfg["vocab_size"])
    # the loaded head is the separate lm_head, not the embedding
    assert not mx.array_equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ---------------------------------------------------------------- determinism, CLI, errors


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = mtm.make_tiny_model(tmp_path / "again")
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other = mtm.make_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_cli_refuses_non_empty_out_then_force(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cmd = [sys.executable, "-m", "mlx_lora.testing.tiny_model", "--out", str(out), "--layers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "not empty" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").exists()
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "parameters:" in r.stdout
    assert not (out / "keep.txt").exists()
    assert mtm.parameter_count(out) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["cli"]  # no temp dirs left behind


def test_empty_existing_out_is_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert (mtm.make_tiny_model(tmp_path / "empty", layers=1) / "config.json").is_file()


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    not_a_tokenizer = tmp_path / "nothing"
    not_a_tokenizer.mkdir()
    with pytest.raises(MlxLoraError, match="no tokenizer files"):
        mtm.make_tiny_model(tmp_path / "out", tokenizer=not_a_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "gpt2"},
        {"heads": 3},
        {"kv_heads": 3},
        {"layers": 0},
        {"tokenizer_kind": "wordpiece"},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(MlxLoraError):
        mtm.make_tiny_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- SentencePiece families

SPM_TEXTS = [
    "Hello world! It's 'quoted' and I'll go.",
    "你好，世界！今天天气怎么样？",
    "emoji 🦙🚀😶‍🌫️ 👍🏽 ok",
    "def f(x):\n    return x**2  # square\n",
    "digits 1234567 3.14159 2024-01-01",
    "tab\tseparated  and   spaces\r\n",
]


@pytest.mark.parametrize(
    "arch,specials,bos_added",
    [
        ("gemma2", ["<start_of_turn>", "<end_of_turn>", "<mask>"], True),
        ("mistral", ["[INST]", "[/INST]"], True),
        ("phi3", ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], False),
    ],
)
def test_sentencepiece_tokenizer_json_equals_tokenizer_model(
    arch: str, specials: list[str], bos_added: bool, tmp_path: Path
) -> None:
    """tokenizer.json (what transformers and mlx-lm use) tokenizes like tokenizer.model (what
    llama.cpp's converter reads): byte fallback for rare characters, one id per special token."""
    spm = pytest.importorskip("sentencepiece")
    out = mtm.make_tiny_model(tmp_path / arch, arch=arch)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tok = _auto_tokenizer(out)
    for text in SPM_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    assert any(sp.is_byte(i) for i in sp.encode("🦙"))  # byte fallback
    for s in specials:
        assert len(tok.encode(s, add_special_tokens=False)) == 1, s
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == bos_added
    cfg = _read_json(out / "config.json")
    assert cfg["vocab_size"] >= len(tok)
    if arch == "gemma2":  # Gemma: no padding rows, no dummy prefix
        assert cfg["vocab_size"] == len(tok)
        assert sp.id_to_piece(sp.encode("Hello")[0]).startswith("H")
    else:
        assert sp.id_to_piece(sp.encode("Hello")[0]).startswith("\u2581")


def test_preset_shape_with_overrides_float32_and_tied_llama(tmp_path: Path) -> None:
    """--config takes a real model's shape (here SmolLM2's, made small); flags override it."""
    from mlx_lm.utils import load

    assert mtm.shape_from_config("qwen2.5-0.5b")["kv_heads"] == 2
    out = tmp_path / "smol"
    rc = mtm.main(
        ["--out", str(out), "--config", "smollm2-135m", "--layers", "1", "--hidden-size", "64"]
        + ["--heads", "4", "--kv-heads", "2", "--intermediate-size", "96", "--dtype", "float32"]
    )
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["vocab_size"], cfg["num_hidden_layers"]) == ("llama", 49152, 1)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert cfg["torch_dtype"] == "float32"
    weights = mx.load(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert all(v.dtype == mx.float32 for v in weights.values())
    model, _ = load(str(out))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 49152)


def test_vocab_size_below_the_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MlxLoraError, match="--vocab-size 100 is smaller than the tokenizer"):
        mtm.make_tiny_model(tmp_path / "v", vocab_size=100)
    assert not (tmp_path / "v").exists()


def test_config_reproduces_a_real_models_shape_in_chunks(tmp_path: Path) -> None:
    """``--config`` takes sizes, vocabulary and the untied head from a real config.json (the 4B
    one, scaled down here); values are written in row chunks at their offsets, and the file is
    the same as one written in large chunks: same bytes."""
    real = {
        "model_type": "qwen2",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 256,
        "vocab_size": 2048,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(real), encoding="utf-8")
    out = tmp_path / "shaped"
    assert mtm.main(["--out", str(out), "--config", str(tmp_path / "config.json")]) == 0
    cfg = _read_json(out / "config.json")
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"], cfg["intermediate_size"]) == (
        2048,
        False,
        256,
    )
    from mlx_lm.utils import load_model

    model, _ = load_model(out)
    assert model.lm_head.weight.shape == (2048, 128)
    saved, mtm.CHUNK_VALUES = mtm.CHUNK_VALUES, 1000  # many small chunks: the same values
    try:
        again = mtm.make_tiny_model(tmp_path / "again", **mtm.shape_from_config(real))
    finally:
        mtm.CHUNK_VALUES = saved
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
