"""llama.cpp's own converters accept our folders unmodified and agree with our GGUF writer.

``python -m mlx_lora.fuse`` promises a folder that llama.cpp's ``convert_hf_to_gguf.py`` converts
as is, and ``mlx_lora.gguf.writer`` promises the GGUF that converter would write, without torch.
Both
promises are checked here against the real converters (``scripts/setup_converter.sh`` puts them,
from the llama-cpp-python sdist, and CPU torch into a venv of their own; this test venv stays
torch-free). Compared with ``gguf.GGUFReader``: tensor names, types, shapes and bytes (f32, and
q8_0 for the llama model: identical), the hyper-parameters and the whole tokenizer; for adapters
``convert_lora_to_gguf.py`` against :func:`mlx_lora.gguf.writer.write_lora_gguf`.

Models: a tiny Qwen2 with the real Qwen1.5 tokenizer, the really trained stories260K llama
(SentencePiece), and a tiny model of every other family mlx_lora writes (``--arch`` qwen3 with the
Qwen1.5 tokenizer, whose hash llama.cpp knows; mistral, smollm, gemma2, gemma3_text, phi3 and a
LongRoPE phi3 with SentencePiece vocabularies), each with a random nonzero adapter fused in fp32.
For an architecture mlx_lora does not write (olmo2), the fused folder converts with llama.cpp's
converter, the way on the export error names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import QWEN_TOKENIZER, REPO, STORIES, make_tiny_model, need

from mlx_lora.export.fuse import fuse
from mlx_lora.gguf.writer import write_gguf, write_lora_gguf
from mlx_lora.testing.adapter import random_adapter

pytestmark = pytest.mark.slow

CONVERTER_DIR = Path(os.environ.get("MLX_LORA_CONVERTER_DIR") or REPO / ".converter")
CONVERTER_PY = CONVERTER_DIR / "venv" / "bin" / "python"
LLAMA_CPP = CONVERTER_DIR / "llama.cpp"
CONVERT_HF = LLAMA_CPP / "convert_hf_to_gguf.py"
CONVERT_LORA = LLAMA_CPP / "convert_lora_to_gguf.py"


def _rope_dims_default(f: dict) -> int:
    """llama.cpp's n_rot when the file has none: the key length, else hidden / heads."""
    arch = f["general.architecture"]
    key_length = f.get(f"{arch}.attention.key_length")
    return key_length or f[f"{arch}.embedding_length"] // f[f"{arch}.attention.head_count"]


def _swa_pattern_default(n: int) -> Callable[[dict], list[bool]]:
    """llama.cpp's default sliding-window layers: all but every n-th (gemma2: 2, gemma3: 6)."""
    return lambda f: [i % n < n - 1 for i in range(f[f"{f['general.architecture']}.block_count"])]


# Keys only one writer may set, with the value llama.cpp assumes when the key is absent: when only
# our GGUF has one, it must equal that default (so llama.cpp loads both files the same way).
# Callables get the other fields of our file (for defaults derived from hyper-parameters).
IMPLIED_DEFAULTS = {
    **{f"{a}.rope.dimension_count": _rope_dims_default for a in ("qwen2", "qwen3", "llama")},
    **{f"{a}.rope.dimension_count": _rope_dims_default for a in ("gemma2", "gemma3")},
    "gemma2.rope.freq_base": lambda f: 10000.0,  # llama.cpp's default base
    "gemma2.attention.sliding_window_pattern": _swa_pattern_default(2),
    "gemma3.attention.sliding_window_pattern": _swa_pattern_default(6),
    "tokenizer.ggml.add_bos_token": lambda f: (
        f["tokenizer.ggml.model"] == "llama"
    ),  # SPM: yes; qwen2 BPE: no
    "tokenizer.ggml.add_eos_token": lambda f: False,
    "tokenizer.ggml.add_sep_token": lambda f: False,
    "tokenizer.ggml.add_space_prefix": lambda f: f["tokenizer.ggml.model"] == "llama",
}
# Naming and bookkeeping: free to differ or to be written by one side only.
COSMETIC = {
    "general.name",
    "general.size_label",
    "general.basename",
    "general.finetune",
    "general.quantization_version",
    "general.file_type",
}


def _need_converter() -> None:
    for path in (CONVERTER_PY, CONVERT_HF, CONVERT_LORA, LLAMA_CPP / "gguf-py" / "gguf"):
        if not path.exists():
            pytest.skip(
                f"{path} is absent: run `bash scripts/setup_converter.sh` "
                "(or point MLX_LORA_CONVERTER_DIR at its folder)"
            )


def _converter_env() -> dict[str, str]:
    """The converter's own gguf-py, no hub access, no OpenBLAS preload meant for MLX."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "NO_LOCAL_GGUF", "VIRTUAL_ENV")
    }
    env["PYTHONPATH"] = str(LLAMA_CPP / "gguf-py")
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "openblas" not in p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def _run_converter(script: Path, *args: str | Path) -> None:
    cmd = [str(CONVERTER_PY), str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_converter_env(), timeout=600)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
        pytest.fail(
            f"{script.name} refused the folder (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{tail}"
        )


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_gguf(
    theirs: Path,
    ours: Path,
    *,
    required: list[str],
    spm_scores: bool = False,
    ours_only: dict | None = None,
) -> tuple[list[str], dict]:
    """Assert the two files hold the same tensors and metadata.

    ``ours_only``: keys llama.cpp's converter leaves out although llama.cpp's default is wrong for
    this config, with the value ours must have. Returns the tolerated differences (to print) and
    our file's metadata.
    """
    ours_only = ours_only or {}
    from gguf import GGUFReader

    a, b = GGUFReader(str(theirs)), GGUFReader(str(ours))
    # Tensors: same set, same type and shape, byte-identical data.
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb), (sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta)))
    for name, x in ta.items():
        y = tb[name]
        assert x.tensor_type == y.tensor_type, (name, x.tensor_type.name, y.tensor_type.name)
        assert list(x.shape) == list(y.shape), (name, list(x.shape), list(y.shape))
        if not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            dx = np.abs(np.asarray(x.data, np.float64) - np.asarray(y.data, np.float64)).max()
            pytest.fail(
                f"tensor {name} differs from llama.cpp's (max |Δ| {dx:.3g} in stored units)"
            )

    fa, fb = _fields(a), _fields(b)
    missing = [k for k in required if k not in fa or k not in fb]
    assert not missing, f"required keys absent: {[(k, k in fa, k in fb) for k in missing]}"
    notes: list[str] = []
    for key in sorted(set(fa) | set(fb)):
        if key in fa and key in fb:
            if fa[key] == fb[key]:
                continue
            if key in COSMETIC:
                notes.append(f"{key}: llama.cpp {_short(fa[key])} vs ours {_short(fb[key])}")
            elif key == "tokenizer.ggml.scores" and spm_scores:
                notes.append(_check_spm_scores(fa, fb))
            else:
                pytest.fail(f"{key}: llama.cpp writes {_short(fa[key])}, ours {_short(fb[key])}")
        elif key in fb and key in ours_only:
            assert fb[key] == ours_only[key], (key, fb[key], ours_only[key])
            notes.append(f"{key}: only ours ({_short(fb[key])}, from config.json; llama.cpp's "
                         f"default would be {_short(IMPLIED_DEFAULTS[key](fb))})")  # fmt: skip
        elif key in fb and key in IMPLIED_DEFAULTS:
            default = IMPLIED_DEFAULTS[key](fb)
            assert fb[key] == default, (
                f"{key}={fb[key]!r} only in ours, but llama.cpp assumes {default!r}"
            )
            notes.append(f"{key}: only ours ({_short(fb[key])} = llama.cpp's default)")
        else:
            side = "llama.cpp" if key in fa else "ours"
            notes.append(f"{key}: only {side} ({_short((fa if key in fa else fb)[key])})")
    return notes, fb


def _check_spm_scores(fa: dict, fb: dict) -> str:
    """SentencePiece scores: llama.cpp copies tokenizer.model's; ours are -merge rank.

    llama.cpp's SPM tokenizer only compares the scores of tokens a merge can produce (it merges the
    adjacent pair whose joined text scores highest), so the two must rank those tokens the same way;
    single characters, bytes and control tokens are never a merge result.
    """
    tokens, types = fa["tokenizer.ggml.tokens"], np.asarray(fa["tokenizer.ggml.token_type"])
    sa, sb = np.asarray(fa["tokenizer.ggml.scores"]), np.asarray(fb["tokenizer.ggml.scores"])
    merged = np.array(
        [i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 1 and sb[i] > -1e8]
    )
    assert len(merged) > 100
    order = merged[np.argsort(-sa[merged], kind="stable")]
    assert np.all(np.diff(sa[order]) < 0), "llama.cpp's scores tie; the ranking check assumes none"
    assert np.all(np.diff(sb[order]) < 0), (
        "our SentencePiece scores rank mergeable tokens differently"
    )
    differ = int((sa != sb).sum())
    return (
        f"tokenizer.ggml.scores: {differ} of {len(sa)} values differ, same ranking of the "
        f"{len(merged)} mergeable tokens (tokenization identical)"
    )


def _report(title: str, notes: list[str]) -> None:
    print(f"\n== {title}: {len(notes)} tolerated difference(s)")
    for n in notes:
        print("  -", n)


def _model_keys(arch: str) -> list[str]:
    per_arch = [
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "context_length",
    ]
    if arch == "gemma2":  # llama.cpp's converter leaves the (default) rope base out
        per_arch.remove("rope.freq_base")
    return [
        "general.architecture",
        "general.type",
        *(f"{arch}.{k}" for k in per_arch),
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ]


LORA_KEYS = ["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    _need_converter()
    return tmp_path_factory.mktemp("llama-cpp-converter")


@pytest.fixture(scope="module")
def qwen(work) -> dict[str, Path]:
    need(QWEN_TOKENIZER)
    base = make_tiny_model(work / "qwen-base", tokenizer=QWEN_TOKENIZER)
    adapter = random_adapter(base, work / "qwen-adapter")
    fused = fuse(str(base), adapter, work / "qwen-fused", dtype="float32")
    return {"base": base, "adapter": adapter, "fused": fused}


@pytest.fixture(scope="module")
def stories(work) -> dict[str, Path]:
    base = need(STORIES)
    adapter = random_adapter(
        base, work / "stories-adapter", targets=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    fused = fuse(str(base), adapter, work / "stories-fused", dtype="float32")
    return {"base": base, "adapter": adapter, "fused": fused}


def test_qwen_fused_folder_converts_and_matches(qwen, work):
    """f32 only: reading a 151,936-token vocabulary with GGUFReader takes ~6 s per file
    (q8_0's block layout is covered by the stories260K model, whose rows of 172 also hit the f16
    fallback)."""
    gguf_type = "f32"
    theirs, ours = work / f"qwen-llama-cpp-{gguf_type}.gguf", work / f"qwen-ours-{gguf_type}.gguf"
    _run_converter(CONVERT_HF, qwen["fused"], "--outtype", gguf_type, "--outfile", theirs)
    write_gguf(qwen["fused"], ours, gguf_type, progress=False)
    required = [
        *_model_keys("qwen2"),
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        "general.sampling.temp",
        "general.sampling.top_p",
        "general.sampling.top_k",
        "general.sampling.penalty_repeat",
    ]
    notes, f = compare_gguf(theirs, ours, required=required)
    _report(f"qwen2 fused {gguf_type}: llama.cpp vs mlx_lora", notes)

    from transformers import AutoTokenizer

    assert f["tokenizer.ggml.pre"] == "qwen2"
    assert len(f["tokenizer.ggml.tokens"]) == 151936
    tok = AutoTokenizer.from_pretrained(str(qwen["fused"]))
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == 151645
    # llama.cpp leaves the pad id out here: without tokenizer.json its converter cannot resolve
    # tokenizer_config's pad_token to an id. Ours carries the tokenizer's own.
    assert f.get("tokenizer.ggml.padding_token_id") == tok.pad_token_id == 151643
    assert f["tokenizer.chat_template"] == tok.chat_template


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_stories_fused_folder_converts_and_matches(stories, work, gguf_type):
    theirs, ours = (
        work / f"stories-llama-cpp-{gguf_type}.gguf",
        work / f"stories-ours-{gguf_type}.gguf",
    )
    _run_converter(CONVERT_HF, stories["fused"], "--outtype", gguf_type, "--outfile", theirs)
    write_gguf(stories["fused"], ours, gguf_type, progress=False)
    notes, _ = compare_gguf(
        theirs, ours, required=[*_model_keys("llama"), "tokenizer.ggml.scores"], spm_scores=True
    )
    _report(f"llama (stories260K) fused {gguf_type}: llama.cpp vs mlx_lora", notes)


def test_qwen_lora_adapter_matches(qwen, work):
    theirs, ours = work / "qwen-lora-llama-cpp.gguf", work / "qwen-lora-ours.gguf"
    _run_converter(
        CONVERT_LORA,
        qwen["adapter"],
        "--base",
        qwen["base"],
        "--outtype",
        "f32",
        "--outfile",
        theirs,
    )
    write_lora_gguf(qwen["adapter"], qwen["base"], ours, "f32")
    notes, _ = compare_gguf(theirs, ours, required=LORA_KEYS)
    _report("qwen2 LoRA adapter: llama.cpp vs mlx_lora", notes)


def test_stories_lora_adapter_matches(stories, work):
    """llama q/k LoRA B rows are permuted to GGUF's RoPE layout by both writers, identically."""
    theirs, ours = work / "stories-lora-llama-cpp.gguf", work / "stories-lora-ours.gguf"
    _run_converter(
        CONVERT_LORA,
        stories["adapter"],
        "--base",
        stories["base"],
        "--outtype",
        "f32",
        "--outfile",
        theirs,
    )
    write_lora_gguf(stories["adapter"], stories["base"], ours, "f32")
    notes, _ = compare_gguf(theirs, ours, required=LORA_KEYS)
    _report("llama (stories260K) LoRA adapter: llama.cpp vs mlx_lora", notes)


def test_converter_venv_is_separate():
    """torch lives in the converter venv only: the package and its tests never import it."""
    _need_converter()
    assert importlib.util.find_spec("torch") is None, "torch is importable in the test venv"
    assert Path(sys.prefix).resolve() != (CONVERTER_PY.parent.parent).resolve()


# ------------------------------------------------------------------ the other families

# case → (make_tiny_model arguments, LoRA targets, keys both files must carry besides the common)
FAMILY_CASES: dict[str, tuple[dict, tuple[str, ...], list[str]]] = {
    "qwen3": (
        {"arch": "qwen3", "tokenizer": QWEN_TOKENIZER},
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ["qwen3.attention.key_length", "qwen3.attention.value_length"],
    ),
    "mistral": (
        {"arch": "mistral"},
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ["llama.attention.key_length", "llama.vocab_size", "llama.rope.dimension_count"],
    ),
    "smollm": (
        {"arch": "smollm", "tokenizer_kind": "spm-llama"},  # SmolLM2's BPE: no known hash
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ["llama.vocab_size", "llama.rope.dimension_count"],
    ),
    "gemma2": (
        {"arch": "gemma2"},
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        [
            "gemma2.attention.key_length",
            "gemma2.attn_logit_softcapping",
            "gemma2.final_logit_softcapping",
            "gemma2.attention.sliding_window",
        ],
    ),
    "gemma3_text": (
        {"arch": "gemma3_text"},
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        [
            "gemma3.attention.key_length",
            "gemma3.rope.freq_base_swa",
            "gemma3.rope.scaling.type",
            "gemma3.rope.scaling.factor",
            "gemma3.attention.sliding_window",
        ],
    ),
    "phi3": (
        {"arch": "phi3"},
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        [
            "phi3.rope.dimension_count",
            "phi3.rope.scaling.original_context_length",
            "phi3.attention.sliding_window",
        ],
    ),
    "phi3-longrope": (
        {
            "arch": "phi3",
            "config_overrides": {
                "max_position_embeddings": 131072,
                "rope_scaling": {
                    "type": "longrope",
                    "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                    "short_factor": [1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.3, 1.3],
                },
            },
        },
        ("qkv_proj", "gate_up_proj"),
        ["phi3.rope.scaling.attn_factor", "phi3.rope.scaling.original_context_length"],
    ),
}


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family(request, work) -> dict:
    case = request.param
    kw, targets, keys = FAMILY_CASES[case]
    if kw.get("tokenizer") is not None:
        need(kw["tokenizer"])
    base = make_tiny_model(work / f"{case}-base", **kw)
    adapter = random_adapter(base, work / f"{case}-adapter", targets=targets)
    fused = fuse(str(base), adapter, work / f"{case}-fused", dtype="float32")
    arch = json.loads((base / "config.json").read_text())["model_type"]
    gguf_arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    return {"case": case, "base": base, "adapter": adapter, "fused": fused, "arch": gguf_arch,
            "keys": keys, "config": json.loads((base / "config.json").read_text())}  # fmt: skip


def test_family_fused_folder_converts_and_matches(family, work):
    """Every tensor byte-identical to llama.cpp's converter, every shared key equal."""
    case, arch = family["case"], family["arch"]
    theirs, ours = work / f"{case}-llama-cpp.gguf", work / f"{case}-ours.gguf"
    _run_converter(CONVERT_HF, family["fused"], "--outtype", "f32", "--outfile", theirs)
    write_gguf(family["fused"], ours, "f32", progress=False)
    ours_only = {}
    if arch == "gemma3":  # the converter leaves the pattern to llama.cpp's default (every 6th)
        types = family["config"]["layer_types"]
        ours_only[f"{arch}.attention.sliding_window_pattern"] = [
            t == "sliding_attention" for t in types
        ]
    notes, f = compare_gguf(
        theirs,
        ours,
        required=[*_model_keys(arch), *family["keys"]],
        spm_scores=f"{case}" != "qwen3",
        ours_only=ours_only,
    )
    _report(f"{case} fused f32: llama.cpp vs mlx_lora", notes)
    assert f["general.architecture"] == arch


def test_family_lora_adapter_matches(family, work):
    """LoRA on every projection kind (Phi-3: the fused ones), as convert_lora_to_gguf.py writes."""
    case = family["case"]
    theirs, ours = work / f"{case}-lora-llama-cpp.gguf", work / f"{case}-lora-ours.gguf"
    _run_converter(
        CONVERT_LORA,
        family["adapter"],
        "--base",
        family["base"],
        "--outtype",
        "f32",
        "--outfile",
        theirs,
    )
    write_lora_gguf(family["adapter"], family["base"], ours, "f32")
    notes, _ = compare_gguf(theirs, ours, required=LORA_KEYS)
    _report(f"{case} LoRA adapter: llama.cpp vs mlx_lora", notes)


def test_other_architecture_converts_with_llama_cpp(work):
    """The way on that export's error names: llama.cpp's converter takes our fused olmo2 folder,
    and llama.cpp runs it like mlx-lm (the Qwen1.5 tokenizer: a BPE whose hash llama.cpp knows)."""
    need(QWEN_TOKENIZER)
    pytest.importorskip("llama_cpp")
    import mlx.core as mx

    from mlx_lora.gguf.llamacpp import llama_logits, open_llama
    from mlx_lora.model.load import load_base
    from mlx_lora.model.prompt import load_hf_tokenizer

    base = make_tiny_model(work / "olmo2-base", arch="olmo2", tokenizer=QWEN_TOKENIZER)
    # transformers builds Qwen's tokenizer from vocab.json/merges.txt only for Qwen model types
    load_hf_tokenizer(QWEN_TOKENIZER).backend_tokenizer.save(str(base / "tokenizer.json"))
    adapter = random_adapter(base, work / "olmo2-adapter", targets=("q_proj", "v_proj"))
    fused = fuse(str(base), adapter, work / "olmo2-fused", dtype="float32")
    out = work / "olmo2-llama-cpp.gguf"
    _run_converter(CONVERT_HF, fused, "--outtype", "f32", "--outfile", out)
    model, tok, _ = load_base(fused, dtype=mx.float32)
    ids = tok.encode("你好，世界！Hello world.")
    ref = np.array(model(mx.array([ids]))[0])
    delta = float(np.abs(llama_logits(open_llama(out, n_ctx=64), ids) - ref).max())
    print(f"\n[olmo2 via convert_hf_to_gguf.py] max|Δlogit| {delta:.2e}")
    assert delta <= 1e-4
