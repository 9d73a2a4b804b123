"""Hugging Face folder → GGUF, and PEFT adapter → GGUF LoRA adapter, with the ``gguf`` package only.

The seed runs llama.cpp's converter, which needs torch and a llama.cpp checkout, and it identifies
BPE pre-tokenizers by hashing the tokenization of a probe string, so a vocabulary it has never
seen is refused (or, worse, mis-labelled). Here the GGUF is written directly: tensor names come
from ``gguf``'s name maps, quantization from its numpy quantizers, and the pre-tokenizer is read
from the tokenizer's own definition (its split regex and settings), so any tokenizer built on a
known pre-tokenizer converts. Ollama accepts safetensors LoRA adapters only for llama/gemma2, so a
Qwen adapter has to be a GGUF adapter: :func:`write_lora_gguf` writes one.

Facts taken from llama.cpp (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``,
``src/llama-vocab.cpp``): llama-architecture q/k rows are permuted from HF's rotate-half RoPE
layout to GGUF's interleaved one (qwen2 uses NeoX RoPE and needs none); norms, biases and other
1-D tensors stay f32; a matrix whose rows do not split into 32-element blocks falls back to f16
under q8_0; LoRA tensors are ``<name>.weight.lora_a`` = A ``[r, in]`` and ``.lora_b`` = B
``[out, r]``, scaled by ``adapter.lora.alpha / r`` at run time.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mlx_lora.errors import MlxLoraError

# HF `architectures` entry → GGUF architecture.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}

# --gguf-type → (tensor type for matrices, general.file_type)
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

_ARCH_ENUM = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}

# Split regexes as tokenizer.json spells them, and the name llama.cpp gives the pre-tokenizer that
# applies the same split. The GPT-2 one is also what ByteLevel(use_regex=true) applies implicitly.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_DIGITS = "<digits>"  # Digits(individual_digits=true), i.e. llama.cpp's leading \p{N} split

# (split steps, ignore_merges) → llama.cpp pre-tokenizer name. ignore_merges=None: either.
_KNOWN_PRE_TOKENIZERS: list[tuple[tuple[str, ...], bool | None, str]] = [
    ((_QWEN2_REGEX,), None, "qwen2"),
    ((_LLAMA3_REGEX,), True, "llama-bpe"),  # llama.cpp: llama3 regex + ignore_merges
    ((_LLAMA3_REGEX,), False, "smaug-bpe"),  # same regex, merges always applied
    ((_GPT2_REGEX,), None, "gpt-2"),
    ((_DIGITS, _GPT2_REGEX), None, "starcoder"),
]

# Without tokenizer.json the tokenizer class defines the split (transformers builds it in code).
_PRE_TOKENIZER_BY_CLASS = {
    "Qwen2Tokenizer": "qwen2",
    "Qwen2TokenizerFast": "qwen2",
    "GPT2Tokenizer": "gpt-2",
    "GPT2TokenizerFast": "gpt-2",
}

_TOKEN_NORMAL = int(gguf.TokenType.NORMAL)
_TOKEN_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_TOKEN_CONTROL = int(gguf.TokenType.CONTROL)
_TOKEN_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
_TOKEN_UNUSED = int(gguf.TokenType.UNUSED)
_TOKEN_BYTE = int(gguf.TokenType.BYTE)

_CHUNK_ELEMENTS = 1 << 24  # convert big matrices ~64 MB (f32) at a time


# --------------------------------------------------------------------------------------------
# safetensors without torch (numpy has no bfloat16, so safetensors.numpy cannot read bf16 files)
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class _StTensor:
    """One tensor inside a safetensors file: enough to memory-map it later."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def array(self) -> np.ndarray:
        """The raw stored array (memory-mapped, read-only); bf16 comes back as uint16 bits."""
        if self.dtype not in _ST_DTYPES:
            raise MlxLoraError(
                f"{self.file}: tensor dtype {self.dtype} is not a float type (a quantized "
                "checkpoint?); fuse/dequantize to float16, bfloat16 or float32 first"
            )
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=_ST_DTYPES[self.dtype])
        raw = np.memmap(
            self.file, dtype=np.uint8, mode="r", offset=self.start, shape=(self.nbytes,)
        )
        return raw.view(_ST_DTYPES[self.dtype]).reshape(self.shape)

    def rows_f32(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Rows of the tensor as float32 (bf16/f16 → f32 is exact)."""
        arr = self.array()
        if rows is not None:
            arr = arr[rows]
        if self.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(arr, dtype=np.float32)


def _read_st_header(path: Path) -> dict[str, _StTensor]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise MlxLoraError(
            f"{path}: not a readable safetensors file ({e}); re-download or re-fuse it"
        ) from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = _StTensor(path, info["dtype"], tuple(info["shape"]), base + begin, end - begin)
    return out


def _index_weights(folder: Path) -> dict[str, _StTensor]:
    """All tensors of an HF checkpoint folder (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise MlxLoraError(f"{index}: unreadable index ({e}); re-download the model") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MlxLoraError(
                f"{folder}: shard(s) {', '.join(missing)} listed in {index.name} are missing; "
                "re-download the model"
            )
    else:
        files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise MlxLoraError(
            f"{folder}: no *.safetensors weights found; pass a Hugging Face model folder (fuse an "
            "adapter first)"
        )
    tensors: dict[str, _StTensor] = {}
    for f in files:
        tensors.update(_read_st_header(f))
    return tensors


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlxLoraError(f"{path} is missing; pass a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise MlxLoraError(f"{path}: unreadable JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise MlxLoraError(f"{path}: expected a JSON object")
    return data


def _load_config(hf_dir: Path) -> tuple[dict, str]:
    """config.json (text_config merged up) and the GGUF architecture name."""
    if not hf_dir.is_dir():
        raise MlxLoraError(f"{hf_dir} is not a folder; pass a Hugging Face model folder")
    cfg = _read_json(hf_dir / "config.json")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise MlxLoraError(
            f"{hf_dir / 'config.json'}: architecture {hf_arch!r} is not supported for GGUF export; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    for key in ("quantization", "quantization_config"):
        if cfg.get(key):
            raise MlxLoraError(
                f"{hf_dir / 'config.json'} describes a quantized checkpoint ({key}); "
                "export from the unquantized model (fuse with --dtype float16/bfloat16)"
            )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(cfg.get(key), int):
            raise MlxLoraError(
                f"{hf_dir / 'config.json'}: {key} is missing; the config is incomplete"
            )
    return cfg, SUPPORTED_ARCHITECTURES[hf_arch]


def _rope(cfg: dict) -> dict:
    """Rope settings whether the config uses ``rope_scaling`` (≤4.x) or ``rope_parameters`` (5.x)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params:
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    params["rope_type"] = rope_type
    return params


def _head_counts(cfg: dict) -> tuple[int, int, int]:
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    return n_head, n_kv, head_dim


def _llama_rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k layout into GGUF's interleaved one.

    Per head, HF stores the first halves of all rotary pairs, then the second halves; llama.cpp's
    llama arch (like Meta's original weights) wants pair members next to each other. It is a pure
    row permutation: new row (h, i, j) = old row (h, j, i) for the view (heads, 2, half).
    """
    half = n_rows // n_head // 2
    idx = np.arange(n_rows).reshape(n_head, 2, half)
    return idx.swapaxes(1, 2).reshape(n_rows)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class GgufVocab:
    """Everything llama.cpp's tokenizer reads from a GGUF (``tokenizer.ggml.*``)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None


def _flatten(node: dict | None, key: str) -> list[dict]:
    """Steps of a (possibly nested) Sequence normalizer/pre-tokenizer/decoder."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        out: list[dict] = []
        for child in node.get(key, []):
            out.extend(_flatten(child, key))
        return out
    return [node]


def identify_pre_tokenizer(definition: dict | None, tokenizer_class: str = "") -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its own definition.

    ``definition`` is tokenizer.json as a dict (None when the folder has none; then the tokenizer
    class decides, e.g. Qwen2Tokenizer → "qwen2"). Raises MlxLoraError naming an unknown split.
    """
    if definition is None:
        name = _PRE_TOKENIZER_BY_CLASS.get(tokenizer_class)
        if name is None:
            raise MlxLoraError(
                f"tokenizer class {tokenizer_class!r} has no tokenizer.json and no known "
                "pre-tokenizer; "
                "save the tokenizer with tokenizer.json (AutoTokenizer.save_pretrained)"
            )
        return name
    steps: list[str] = []
    for step in _flatten(definition.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            if "Regex" not in pattern or step.get("behavior") != "Isolated" or step.get("invert"):
                raise MlxLoraError(
                    f"tokenizer pre-tokenizer Split {json.dumps(step)} is not one llama.cpp "
                    "implements; export is not possible"
                )
            steps.append(pattern["Regex"])
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise MlxLoraError(
                    "tokenizer pre-tokenizer ByteLevel(add_prefix_space=true) is not supported by "
                    "llama.cpp"
                )
            if step.get("use_regex", True):
                steps.append(_GPT2_REGEX)
        elif kind == "Digits":
            if not step.get("individual_digits"):
                raise MlxLoraError(
                    "tokenizer pre-tokenizer Digits(individual_digits=false) is not supported by "
                    "llama.cpp"
                )
            steps.append(_DIGITS)
        else:
            raise MlxLoraError(
                f"tokenizer pre-tokenizer step {kind!r} is not supported by llama.cpp's BPE "
                "tokenizer"
            )
    ignore_merges = bool(definition.get("model", {}).get("ignore_merges", False))
    for known_steps, known_ignore, name in _KNOWN_PRE_TOKENIZERS:
        if tuple(steps) == known_steps and known_ignore in (None, ignore_merges):
            return name
    shown = " + ".join(steps) if steps else "(none)"
    raise MlxLoraError(
        f'unknown BPE pre-tokenizer split "{shown}" (ignore_merges={ignore_merges}); llama.cpp '
        "has no matching pre-tokenizer, so the GGUF would tokenize differently from the HF model"
    )


def _is_sentencepiece(definition: dict | None, hf_dir: Path) -> bool:
    """SentencePiece-style vocab (▁ for spaces, <0xNN> byte fallback) vs byte-level BPE."""
    if definition is None:
        return (hf_dir / "tokenizer.model").is_file()
    model = definition.get("model", {})
    if model.get("type") == "Unigram":
        raise MlxLoraError(
            f"{hf_dir}: SentencePiece unigram vocabularies are not supported; use a BPE-based model"
        )
    if model.get("type") != "BPE":
        raise MlxLoraError(
            f"{hf_dir}: tokenizer model {model.get('type')!r} is not supported; only BPE "
            "vocabularies are"
        )
    pre = _flatten(definition.get("pre_tokenizer"), "pretokenizers")
    norm = _flatten(definition.get("normalizer"), "normalizers")
    metaspace = any(s.get("type") == "Metaspace" for s in pre)
    replaces_space = any(
        s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " for s in norm
    )
    return bool(model.get("byte_fallback")) and (metaspace or replaces_space)


def _spm_add_space_prefix(definition: dict) -> bool:
    for s in _flatten(definition.get("pre_tokenizer"), "pretokenizers"):
        if s.get("type") == "Metaspace":
            scheme = s.get("prepend_scheme")
            if scheme is None:
                return bool(s.get("add_prefix_space", True))
            return scheme in ("always", "first")
    for s in _flatten(definition.get("normalizer"), "normalizers"):
        if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
            return True
    return False


def _merge_strings(merges: list) -> list[str]:
    """tokenizer.json merges (``"a b"`` or ``["a", "b"]``) as GGUF's ``"a b"`` strings."""
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:
            # llama.cpp's convention for a literal space inside a merge part: U+0120 (= ' ' + 256)
            out.append(" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in m))
    return out


def _tokenizer_definition(hf_dir: Path, tok: Any) -> tuple[dict | None, dict]:
    """(tokenizer.json from disk or None, the loaded tokenizer's full definition)."""
    file_def = None
    if (hf_dir / "tokenizer.json").is_file():
        file_def = _read_json(hf_dir / "tokenizer.json")
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        full = json.loads(backend.to_str())
    elif file_def is not None:
        full = file_def
    else:
        raise MlxLoraError(
            f"{hf_dir}: the tokenizer has no fast (tokenizers) definition; save it with "
            "tokenizer.json"
        )
    return file_def, full


def read_vocab(hf_dir: Path, n_vocab: int | None = None) -> GgufVocab:
    """The full GGUF vocabulary of the tokenizer in ``hf_dir``, padded to ``n_vocab`` rows."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_dir = Path(hf_dir)
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers raises many types for a broken/missing tokenizer
        raise MlxLoraError(
            f"{hf_dir}: cannot load the tokenizer ({type(e).__name__}: {e}); the folder needs "
            "tokenizer files"
        ) from None
    file_def, full_def = _tokenizer_definition(hf_dir, tok)
    vocab: dict[str, int] = tok.get_vocab()
    size = max(vocab.values()) + 1
    if n_vocab is None:
        n_vocab = size
    if size > n_vocab:
        raise MlxLoraError(
            f"{hf_dir}: the tokenizer has {size} tokens but the embedding has only {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
    added = tok.added_tokens_decoder  # id → AddedToken
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    spm = _is_sentencepiece(full_def, hf_dir)
    cls_name = type(tok).__name__

    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] | None = [] if spm else None
    merges = _merge_strings(full_def.get("model", {}).get("merges", []))
    rank: dict[str, int] = {}
    if spm:
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
    unk_id = tok.unk_token_id
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
            if scores is not None:
                scores.append(-1000.0)
            continue
        if i in added:
            special = added[i].special or (text.startswith("<|") and text.endswith("|>"))
            kind = _TOKEN_CONTROL if special else _TOKEN_USER_DEFINED
            if i == unk_id:
                kind = _TOKEN_UNKNOWN
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = _TOKEN_BYTE
        elif i == unk_id:
            kind = _TOKEN_UNKNOWN
        else:
            kind = _TOKEN_NORMAL
        tokens.append(text)
        types.append(kind)
        if scores is not None:
            # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the
            # highest score; HF merges by rank. score = -rank makes both pick the same pair.
            if kind == _TOKEN_NORMAL and text in rank:
                scores.append(-float(rank[text]))
            elif kind == _TOKEN_NORMAL and len(text) > 1:
                scores.append(-1e9)  # reachable by no merge
            else:
                scores.append(0.0 if kind in (_TOKEN_NORMAL, _TOKEN_BYTE) else -1000.0)

    cfg_path = hf_dir / "config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}

    def _cfg_id(key: str) -> int | None:
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        return v if isinstance(v, int) and 0 <= v < n_vocab else None

    bos = tok.bos_token_id if tok.bos_token_id is not None else _cfg_id("bos_token_id")
    eos = tok.eos_token_id if tok.eos_token_id is not None else _cfg_id("eos_token_id")
    # What HF really does when asked to add special tokens, not what a config flag claims.
    probe = tok("a")["input_ids"]
    add_bos = bool(probe) and bos is not None and probe[0] == bos
    add_eos = bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1

    template = tok.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]

    if spm:
        result = GgufVocab(
            model="llama",
            pre="default",
            tokens=tokens,
            token_types=types,
            scores=scores,
            add_space_prefix=_spm_add_space_prefix(full_def),
        )
    else:
        if file_def is None and cls_name not in _PRE_TOKENIZER_BY_CLASS:
            pre = identify_pre_tokenizer(full_def)  # the split transformers built for this class
        else:
            pre = identify_pre_tokenizer(file_def, cls_name)
        result = GgufVocab(
            model="gpt2",
            pre=pre,
            tokens=tokens,
            token_types=types,
            merges=merges,
        )
    result.bos_id, result.eos_id = bos, eos
    result.unk_id, result.pad_id = unk_id, tok.pad_token_id
    result.add_bos, result.add_eos = add_bos, add_eos
    result.chat_template = template
    return result


def _add_vocab(w: gguf.GGUFWriter, v: GgufVocab) -> None:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    for setter, value in (
        (w.add_bos_token_id, v.bos_id),
        (w.add_eos_token_id, v.eos_id),
        (w.add_unk_token_id, v.unk_id),
        (w.add_pad_token_id, v.pad_id),
    ):
        if value is not None:
            setter(value)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # logical (numpy order)
    qtype: gguf.GGMLQuantizationType
    load: Any  # callable(rows slice) -> float32 rows, or None when `data` is set
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = math.prod(self.shape)
        return n // block * type_size


def _tensor_qtype(
    name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp's rules: 1-D, norms and non-weight tensors stay f32; unblockable rows → f16."""
    if (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith((".weight", ".lora_a", ".lora_b"))
    ):
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def _encode(plan: _Planned) -> np.ndarray:
    """The bytes of one tensor in its GGUF type, converted a chunk of rows at a time."""
    if plan.data is not None:
        return gguf.quants.quantize(plan.data.astype(np.float32), plan.qtype)
    if len(plan.shape) < 2:
        return gguf.quants.quantize(plan.load(None), plan.qtype)
    n_rows = plan.shape[0]
    row_elems = max(1, math.prod(plan.shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // row_elems)
    out: np.ndarray | None = None
    for start in range(0, n_rows, step):
        enc = gguf.quants.quantize(plan.load(slice(start, min(start + step, n_rows))), plan.qtype)
        if out is None:
            if step >= n_rows:
                return enc
            out = np.empty((n_rows, *enc.shape[1:]), dtype=enc.dtype)
        out[start : start + enc.shape[0]] = enc
    assert out is not None
    return out


def _row_loader(src: _StTensor, perm: np.ndarray | None, scale: float = 1.0):
    def load(rows: slice | None) -> np.ndarray:
        idx: Any = rows
        if perm is not None:
            idx = perm if rows is None else perm[rows]
        x = src.rows_f32(idx)
        return x * np.float32(scale) if scale != 1.0 else x

    return load


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for rope_type "llama3" (per-frequency divisors)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _block_id(name: str) -> int:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return -1


def _plan_model_tensors(
    hf_dir: Path, cfg: dict, arch: str, wanted: gguf.GGMLQuantizationType
) -> list[_Planned]:
    weights = _index_weights(hf_dir)
    n_layers = cfg["num_hidden_layers"]
    n_head, n_kv, _ = _head_counts(cfg)
    tmap = gguf.get_tensor_name_map(_ARCH_ENUM[arch], n_layers)
    planned: dict[str, _Planned] = {}
    for hf_name in sorted(weights, key=lambda n: (_block_id(n), n)):
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias")):
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MlxLoraError(
                f"{hf_dir}: tensor {hf_name!r} has no GGUF counterpart for {arch}; the checkpoint "
                "has layers llama.cpp cannot load"
            )
        src = weights[hf_name]
        perm = None
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            perm = _llama_rope_rows(src.shape[0], n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            perm = _llama_rope_rows(src.shape[0], n_kv)
        planned[gname] = _Planned(
            gname, src.shape, _tensor_qtype(gname, src.shape, wanted), _row_loader(src, perm)
        )

    required = ["token_embd.weight", "output_norm.weight"]
    per_block = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    for b in range(n_layers):
        required += [f"blk.{b}.{t}.weight" for t in per_block]
        if arch == "qwen2":
            required += [f"blk.{b}.{t}.bias" for t in ("attn_q", "attn_k", "attn_v")]
    if not cfg.get("tie_word_embeddings", False):
        required.append("output.weight")
    missing = [n for n in required if n not in planned]
    if missing:
        raise MlxLoraError(
            f"{hf_dir}: weights missing for "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; the checkpoint is "
            "incomplete, re-download or re-fuse it"
        )

    order = ["token_embd.weight"]
    rope = _rope(cfg)
    if rope["rope_type"] == "llama3":
        _, _, head_dim = _head_counts(cfg)
        factors = _llama3_rope_factors(rope, head_dim)
        planned["rope_freqs.weight"] = _Planned(
            "rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, None, factors
        )
        order.append("rope_freqs.weight")
    rest = [n for n in planned if n not in order]
    rest.sort(key=lambda n: (n.startswith("output"), _block_id(n), n))
    return [planned[n] for n in order + rest]


def _add_hparams(
    w: gguf.GGUFWriter, cfg: dict, arch: str, ftype: gguf.LlamaFileType, n_vocab: int
) -> None:
    n_head, n_kv, head_dim = _head_counts(cfg)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(n_vocab)
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(
            int(rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings"))
        )
    elif kind == "llama3" and arch == "llama":
        pass  # carried by the rope_freqs tensor
    elif kind != "default":
        raise MlxLoraError(
            f"rope scaling type {kind!r} in config.json is not supported for GGUF export "
            "(supported: linear, yarn, llama3)"
        )
    w.add_file_type(int(ftype))


def _add_sampling(w: gguf.GGUFWriter, hf_dir: Path) -> None:
    """generation_config.json's sampling advice as ``general.sampling.*``.

    llama-server and llama-cli use these keys as their defaults, and llama.cpp's converter writes
    them, so without them llama.cpp would sample a fused model differently from our chat. As in
    transformers (and our chat), ``do_sample: false`` means greedy, i.e. temperature 0.
    """
    path = hf_dir / "generation_config.json"
    try:
        gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return  # an unreadable generation_config is not worth refusing the export for
    if not isinstance(gen, dict):
        return

    def num(key: str) -> float | None:
        v = gen.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    if isinstance(gen.get("top_k"), int) and not isinstance(gen["top_k"], bool):
        w.add_sampling_top_k(gen["top_k"])
    for key, setter in (
        ("top_p", w.add_sampling_top_p),
        ("min_p", w.add_sampling_min_p),
        ("repetition_penalty", w.add_sampling_penalty_repeat),
    ):
        if (v := num(key)) is not None:
            setter(v)
    temp = 0.0 if gen.get("do_sample") is False else num("temperature")
    if temp is not None:
        w.add_sampling_temp(temp)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _gguf_type(gguf_type: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    key = str(gguf_type).lower()
    if key not in GGUF_TYPES:
        raise MlxLoraError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[key]


def _write_file(
    out_path: Path, writer_setup, plans: list[_Planned], progress: bool, arch: str
) -> Path:
    """Write header, metadata and tensors to a temp file beside ``out_path``, then rename."""
    from tqdm import tqdm

    out_path = Path(out_path)
    if out_path.is_dir():
        raise MlxLoraError(f"{out_path} is a folder; pass the path of the .gguf file to write")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer_setup(writer)
        for p in plans:
            writer.add_tensor_info(
                p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(p.nbytes for p in plans)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"GGUF {out_path.name}",
            disable=not progress,
        ) as bar:
            for p in plans:
                data = _encode(p)
                writer.write_tensor_data(data)
                bar.update(p.nbytes)
                del data
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def write_gguf(
    hf_dir: Path,
    out_path: Path,
    gguf_type: str = "f16",
    *,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Convert the Hugging Face model folder ``hf_dir`` into one GGUF file at ``out_path``.

    ``gguf_type``: f32, f16, bf16 or q8_0 (matrices; norms/biases stay f32). Tensors are read
    memory-mapped and written one at a time, so memory stays near one tensor's size. ``name``
    sets general.name (default: the folder name). Returns ``out_path``.
    """
    wanted, ftype = _gguf_type(gguf_type)
    hf_dir = Path(hf_dir)
    cfg, arch = _load_config(hf_dir)
    plans = _plan_model_tensors(hf_dir, cfg, arch, wanted)
    n_vocab = next(p.shape[0] for p in plans if p.name == "token_embd.weight")
    vocab = read_vocab(hf_dir, n_vocab)

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or hf_dir.resolve().name)
        _add_hparams(w, cfg, arch, ftype, n_vocab)
        _add_sampling(w, hf_dir)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(w, vocab)

    return _write_file(out_path, setup, plans, progress, arch)


def write_lora_gguf(
    adapter_dir: Path,
    base_hf_dir: Path,
    out_path: Path,
    gguf_type: str = "f32",
    *,
    progress: bool = False,
    name: str | None = None,
) -> Path:
    """Convert a PEFT LoRA adapter (``adapter_dir``) for ``base_hf_dir`` into a GGUF LoRA adapter.

    The result loads with llama.cpp's ``--lora`` and Ollama's ``ADAPTER`` on top of the base
    model's GGUF. Per-module scales that llama.cpp cannot express (rsLoRA, alpha_pattern) are
    folded into lora_b so that llama.cpp's ``alpha / r`` gives PEFT's exact update.
    """
    wanted, ftype = _gguf_type(gguf_type)
    adapter_dir, base_hf_dir = Path(adapter_dir), Path(base_hf_dir)
    cfg, arch = _load_config(base_hf_dir)
    acfg = _read_json(adapter_dir / "adapter_config.json")
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MlxLoraError(
            f"{adapter_dir / 'adapter_config.json'}: peft_type {acfg.get('peft_type')!r} is not "
            "LORA"
        )
    try:
        r = int(acfg["r"])
        alpha = float(acfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise MlxLoraError(
            f"{adapter_dir / 'adapter_config.json'}: r and lora_alpha are required"
        ) from None
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise MlxLoraError(
            f"{weights_path} is missing; pass an adapter folder written by mlx_lora.train"
        )
    tensors = _read_st_header(weights_path)
    alpha_pattern: dict = acfg.get("alpha_pattern") or {}
    rank_pattern: dict = acfg.get("rank_pattern") or {}
    rslora = bool(acfg.get("use_rslora"))

    try:
        base_shapes = {k: v.shape for k, v in _index_weights(base_hf_dir).items()}
    except MlxLoraError:
        base_shapes = {}  # config-only base: shapes cannot be cross-checked
    n_head, n_kv, _ = _head_counts(cfg)
    tmap = gguf.get_tensor_name_map(_ARCH_ENUM[arch], cfg["num_hidden_layers"])
    prefix = "base_model.model."
    modules: dict[str, dict[str, _StTensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.*)\.lora_([AB])\.weight", key)
        if m is None:
            raise MlxLoraError(
                f"{weights_path}: unexpected tensor {key!r}; only lora_A/lora_B weights can go "
                "into a GGUF adapter"
            )
        module = m.group(1)[len(prefix) :] if m.group(1).startswith(prefix) else m.group(1)
        modules.setdefault(module, {})[m.group(2)] = t
    if not modules:
        raise MlxLoraError(f"{weights_path} holds no LoRA tensors; train an adapter first")

    plans: list[_Planned] = []
    for module in sorted(modules, key=lambda n: (_block_id(n), n)):
        pair = modules[module]
        if set(pair) != {"A", "B"}:
            raise MlxLoraError(
                f"{weights_path}: {module} has lora_{''.join(pair)} without its partner; the "
                "adapter is damaged"
            )
        a, b = pair["A"], pair["B"]
        base_name = module + ".weight"
        if module.endswith("embed_tokens"):
            raise MlxLoraError(
                f"{weights_path}: LoRA on embed_tokens cannot be exported to a GGUF adapter; "
                "retrain without it"
            )
        gname = tmap.get_name(base_name, try_suffixes=(".weight",))
        if gname is None:
            raise MlxLoraError(
                f"{weights_path}: module {module!r} has no GGUF counterpart for {arch}"
            )
        if (
            gname == "output.weight"
            and cfg.get("tie_word_embeddings", False)
            and "lm_head.weight" not in base_shapes
        ):
            raise MlxLoraError(
                f"{weights_path}: LoRA on lm_head cannot apply to a model with tied embeddings; "
                "retrain without lm_head"
            )
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise MlxLoraError(
                f"{weights_path}: {module} lora_A {a.shape} / lora_B {b.shape} do not form [r, "
                "in] / [out, r]"
            )
        rank = a.shape[0]
        if base_name in base_shapes and tuple(base_shapes[base_name]) != (b.shape[0], a.shape[1]):
            raise MlxLoraError(
                f"{weights_path}: {module} is {b.shape[0]}x{a.shape[1]} in the adapter but "
                f"{base_shapes[base_name]} "
                f"in {base_hf_dir}; the adapter was trained on a different base model"
            )
        short = module.rsplit(".", 1)[-1]
        mod_rank = next((v for k, v in rank_pattern.items() if module.endswith(k) or short == k), r)
        mod_alpha = next(
            (v for k, v in alpha_pattern.items() if module.endswith(k) or short == k), alpha
        )
        if mod_rank != rank:
            raise MlxLoraError(
                f"{weights_path}: {module} has rank {rank} but adapter_config.json says {mod_rank}"
            )
        peft_scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        fold = peft_scale * rank / alpha  # llama.cpp applies alpha / rank
        perm = None
        if arch == "llama" and short == "q_proj":
            perm = _llama_rope_rows(b.shape[0], n_head)
        elif arch == "llama" and short == "k_proj":
            perm = _llama_rope_rows(b.shape[0], n_kv)
        plans.append(
            _Planned(
                gname + ".lora_a",
                a.shape,
                _tensor_qtype(gname + ".lora_a", a.shape, wanted),
                _row_loader(a, None),
            )
        )
        plans.append(
            _Planned(
                gname + ".lora_b",
                b.shape,
                _tensor_qtype(gname + ".lora_b", b.shape, wanted),
                _row_loader(b, perm, fold),
            )
        )

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(name or adapter_dir.resolve().name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return _write_file(out_path, setup, plans, progress, arch)
