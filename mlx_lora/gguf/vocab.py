"""A Hugging Face tokenizer as the ``tokenizer.ggml.*`` vocabulary llama.cpp reads from a GGUF.

llama.cpp identifies BPE pre-tokenizers by hashing the tokenization of a probe string, so its own
converter refuses (or mis-labels) a vocabulary it has never seen. Here the pre-tokenizer is read
from the tokenizer's own definition (its split regex and settings), so any tokenizer built on a
split llama.cpp implements converts. SentencePiece-style BPE vocabularies (``▁`` for spaces,
``<0xNN>`` byte fallback) become llama.cpp's "llama" tokenizer with scores that make its
highest-score merge order equal Hugging Face's merge ranks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json
from mlx_lora.model.gguf_tokenizer import DIGIT, DIGIT_RUN, GPT2_REGEX, PRE_TOKENIZERS
from mlx_lora.model.prompt import hf_tokenizer, load_hf_tokenizer

# Split regexes as tokenizer.json spells them, and the name llama.cpp gives the pre-tokenizer that
# applies the same split. The GPT-2 one is also what ByteLevel(use_regex=true) applies implicitly.

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
    hf_json: str | None = None  # tokenizer.json verbatim, for an exact import back
    rstrip_specials: tuple[str, ...] = ()  # special tokens that swallow the whitespace after them


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


def identify_pre_tokenizer(
    definition: dict | None, tokenizer_class: str = "", clean_spaces: bool | None = None
) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its own definition.

    ``definition`` is tokenizer.json as a dict (None when the folder has none; then the tokenizer
    class decides, e.g. Qwen2Tokenizer → "qwen2"). When several names share the split,
    ``clean_spaces`` (the tokenizer's clean_up_tokenization_spaces) picks the one that detokenizes
    alike. Raises MlxLoraError naming an unknown split.
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
                steps.append(GPT2_REGEX)
        elif kind == "Digits":
            steps.append(DIGIT if step.get("individual_digits") else DIGIT_RUN)
        else:
            raise MlxLoraError(
                f"tokenizer pre-tokenizer step {kind!r} is not supported by llama.cpp's BPE "
                "tokenizer"
            )
    ignore_merges = bool(definition.get("model", {}).get("ignore_merges", False))
    names = [
        name
        for name, (known_steps, known_ignore, _) in PRE_TOKENIZERS.items()
        if tuple(steps) == known_steps and known_ignore in (None, ignore_merges)
    ]
    if names:
        alike = [n for n in names if PRE_TOKENIZERS[n][2] == clean_spaces]
        return (alike or names)[0]
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
        file_def = read_json(hf_dir / "tokenizer.json")
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


def _token_kind(i: int, text: str, tok: Any, spm: bool) -> int:
    """llama.cpp's token type: control for special added tokens, byte for ``<0xNN>``, ...

    The unknown token is "unknown" unless tokenizer_config.json lists it as a special added token
    (llama.cpp's converter then makes it a control token, as for every listed special token).
    """
    added = tok.added_tokens_decoder  # id → AddedToken
    if i == tok.unk_token_id and i not in getattr(tok, "_mlx_lora_listed_specials", ()):
        return _TOKEN_UNKNOWN
    if i in added:
        special = added[i].special or (text.startswith("<|") and text.endswith("|>"))
        return _TOKEN_CONTROL if special else _TOKEN_USER_DEFINED
    if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
        return _TOKEN_BYTE
    return _TOKEN_NORMAL


def _token_table(
    tok: Any, n_vocab: int, merges: list[str] | None
) -> tuple[list[str], list[int], list[float] | None]:
    """Token texts, types and (SentencePiece: ``merges`` given) scores, padded to ``n_vocab``."""
    by_id: dict[int, str] = {i: t for t, i in tok.get_vocab().items()}
    rank: dict[str, int] = {}
    for r, m in enumerate(merges or []):
        rank.setdefault(m.replace(" ", ""), r)
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] | None = [] if merges is not None else None
    for i in range(n_vocab):
        text = by_id.get(i)
        kind = _TOKEN_UNUSED if text is None else _token_kind(i, text, tok, scores is not None)
        tokens.append(f"[PAD{i}]" if text is None else text)
        types.append(kind)
        if scores is None:
            continue
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the
        # highest score; HF merges by rank. score = -rank makes both pick the same pair.
        if kind == _TOKEN_NORMAL and text in rank:
            scores.append(-float(rank[text]))
        elif kind == _TOKEN_NORMAL and len(text) > 1:
            scores.append(-1e9)  # reachable by no merge
        else:
            scores.append(0.0 if kind in (_TOKEN_NORMAL, _TOKEN_BYTE) else -1000.0)
    return tokens, types, scores


def _special_ids(tok: Any, hf_dir: Path, n_vocab: int) -> tuple[int | None, int | None, bool, bool]:
    """bos, eos (the tokenizer's, else config.json's) and whether HF adds them to a text."""
    cfg = read_json(hf_dir / "config.json")

    def cfg_id(key: str) -> int | None:
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        return v if isinstance(v, int) and 0 <= v < n_vocab else None

    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg_id("bos_token_id")
    eos = tok.eos_token_id if tok.eos_token_id is not None else cfg_id("eos_token_id")
    add_bos, add_eos = _adds_specials(tok, bos, eos)
    return bos, eos, add_bos, add_eos


def _adds_specials(tok: Any, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """What HF really does when asked to add special tokens, not what a config flag claims."""
    probe = tok("a")["input_ids"]
    add_bos = bool(probe) and bos is not None and probe[0] == bos
    add_eos = bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1
    return add_bos, add_eos


def adds_bos(tokenizer: Any, hf_dir: Path | None = None) -> bool:
    """The ``tokenizer.ggml.add_bos_token`` :func:`read_vocab` records for this tokenizer (of the
    folder ``hf_dir``, whose config.json may name the bos id): whether llama.cpp, and so Ollama,
    puts BOS in front of every prompt by itself."""

    tok = hf_tokenizer(tokenizer)
    if hf_dir is not None:
        return _special_ids(tok, Path(hf_dir), max(tok.get_vocab().values()) + 1)[2]
    return _adds_specials(tok, tok.bos_token_id, tok.eos_token_id)[0]


def read_vocab(hf_dir: Path, n_vocab: int | None = None) -> GgufVocab:
    """The full GGUF vocabulary of the tokenizer in ``hf_dir``, padded to ``n_vocab`` rows."""
    hf_dir = Path(hf_dir)
    tok = load_hf_tokenizer(hf_dir)
    listed = read_json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    tok._mlx_lora_listed_specials = {
        int(i) for i, t in listed.items() if isinstance(t, dict) and t.get("special")
    }
    file_def, full_def = _tokenizer_definition(hf_dir, tok)
    size = max(tok.get_vocab().values()) + 1
    n_vocab = size if n_vocab is None else n_vocab
    if size > n_vocab:
        raise MlxLoraError(
            f"{hf_dir}: the tokenizer has {size} tokens but the embedding has only {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
    merges = _merge_strings(full_def.get("model", {}).get("merges", []))
    if _is_sentencepiece(full_def, hf_dir):
        tokens, types, scores = _token_table(tok, n_vocab, merges)
        result = GgufVocab("llama", "default", tokens, types, scores=scores)
        result.add_space_prefix = _spm_add_space_prefix(full_def)
    else:
        cls_name = type(tok).__name__
        clean = getattr(tok, "clean_up_tokenization_spaces", None)
        if file_def is None and cls_name not in _PRE_TOKENIZER_BY_CLASS:
            # the split transformers built for this class
            pre = identify_pre_tokenizer(full_def, clean_spaces=clean)
        else:
            pre = identify_pre_tokenizer(file_def, cls_name, clean)
        tokens, types, _ = _token_table(tok, n_vocab, None)
        result = GgufVocab("gpt2", pre, tokens, types, merges=merges)
    result.bos_id, result.eos_id, result.add_bos, result.add_eos = _special_ids(
        tok, hf_dir, n_vocab
    )
    result.unk_id, result.pad_id = tok.unk_token_id, tok.pad_token_id
    template = tok.chat_template
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    result.chat_template = template
    if file_def is not None:
        result.hf_json = (hf_dir / "tokenizer.json").read_text(encoding="utf-8")
    result.rstrip_specials = tuple(
        t.content for t in tok.added_tokens_decoder.values() if t.special and t.rstrip
    )
    return result


def add_vocab(w: gguf.GGUFWriter, v: GgufVocab) -> None:
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
    if v.hf_json:  # llama.cpp ignores it; mlx_lora.model.gguf_tokenizer imports it back exactly
        w.add_string(gguf.Keys.Tokenizer.HF_JSON, v.hf_json)
