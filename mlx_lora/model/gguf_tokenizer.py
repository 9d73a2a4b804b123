"""A GGUF's tokenizer (``tokenizer.ggml.*``) rebuilt as Hugging Face ``tokenizer.json`` + config.

A GGUF carries no tokenizer.json: llama.cpp keeps the token list, token types, merges (byte-level
BPE) or scores (SentencePiece), the special ids and a pre-tokenizer *name*. This module turns that
back into a definition the ``tokenizers`` library runs, so that transformers, mlx-lm and our own
exporter see the same tokenizer llama.cpp does:

- ``gpt2`` (byte-level BPE): tokens and merges as stored; the split is looked up by the
  pre-tokenizer name in :data:`PRE_TOKENIZERS`, the table the exporter
  names a split by, so an imported model exports back under its original name.
- ``llama`` (SentencePiece BPE): llama.cpp merges the adjacent pair whose result has the highest
  score; a BPE whose merges are ranked by that score does the same. Spaces become ``▁`` and, with
  ``add_space_prefix``, every text run starts with one (llama.cpp adds it after each special
  token too, as the Prepend normalizer does); unknown characters fall back to ``<0xNN>`` bytes.
- ``gemma4``: merges on raw UTF-8 with spaces as ``▁`` and text split at newlines.

Control, unknown and user-defined tokens become added tokens (matched before the split, as
llama.cpp does); ``[PADn]`` fillers that converters append up to the embedding size are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import gguf

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.meta import END_TOKEN_TEXTS

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN35_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DIGIT = r"\p{N}"  # Digits(individual_digits=true): every digit on its own
DIGIT_RUN = r"\p{N}+"  # Digits(individual_digits=false): runs of digits
_DEEPSEEK_CODER_STEPS = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", DIGIT)

# llama.cpp pre-tokenizer name → (split steps in order, ignore_merges (None: either), clean_spaces).
# The steps are the regexes tokenizer.json spells (ByteLevel(use_regex=true) is the GPT-2 one).
# Names that share a split differ only in llama.cpp's clean_spaces (how it detokenizes), which is
# the tokenizer's clean_up_tokenization_spaces. The importer (this module) reads this table the
# other way round; the exporter (mlx_lora.gguf.vocab) writes it, so a GGUF we import exports back
# under the same name.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool | None, bool]] = {
    "qwen2": ((_QWEN2_REGEX,), None, False),
    "qwen35": ((_QWEN35_REGEX,), None, False),
    "llama-bpe": ((_LLAMA3_REGEX,), True, True),  # llama.cpp: llama3 regex + ignore_merges
    "smaug-bpe": ((_LLAMA3_REGEX,), False, True),  # same regex, merges always applied
    "gpt-2": ((GPT2_REGEX,), None, True),
    "starcoder": ((DIGIT, GPT2_REGEX), None, True),
    "smollm": ((DIGIT, GPT2_REGEX), None, False),
    "deepseek-coder": (_DEEPSEEK_CODER_STEPS, None, False),
}

_NORMAL = int(gguf.TokenType.NORMAL)
_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
_ADDED = (_UNKNOWN, _CONTROL, _USER_DEFINED)

# llama.cpp pre-tokenizer names that apply the split of a PRE_TOKENIZERS entry, with llama.cpp's
# clean_spaces for each (src/llama-vocab.cpp). Names not listed here are refused.
_PRE_ALIASES: dict[str, tuple[str, bool]] = {
    **{n: ("gpt-2", True) for n in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "a.x-4.0", "mellum")},
    **{n: ("qwen2", False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")},
    **{n: ("qwen2", True) for n in ("stablelm2", "hunyuan", "solar-open")},
    "qwen35": ("qwen35", False),
    **{
        n: ("llama-bpe", True)
        for n in ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "midm-2.0", "lfm2")
    },
    **{n: ("smaug-bpe", True) for n in ("smaug-bpe", "dbrx")},
    **{n: ("starcoder", True) for n in ("starcoder", "refact", "codeshell", "exaone")},
    **{n: ("starcoder", False) for n in ("smollm", "command-r")},
    "deepseek-coder": ("deepseek-coder", False),
}
# llama.cpp adds BOS by default (no tokenizer.ggml.add_bos_token) for SentencePiece and these.
_ADD_BOS_BY_DEFAULT = {"llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1"}


_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}


def special_ids(meta: Mapping[str, Any], n_tokens: int) -> dict[str, int]:
    """bos/eos/unk/pad/eot/eom ids the GGUF names (only ids inside the vocabulary)."""
    out = {}
    for name, key in _SPECIAL_KEYS.items():
        v = meta.get(key)
        if isinstance(v, int) and 0 <= v < n_tokens:
            out[name] = v
    return out


def end_token_ids(meta: Mapping[str, Any]) -> list[int]:
    """What stops generation in llama.cpp: eos, eot, eom and the end-of-turn tokens by text."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    ids = special_ids(meta, len(tokens))
    out = [ids[k] for k in ("eos", "eot", "eom") if k in ids]
    for i, t in enumerate(tokens):
        if t in END_TOKEN_TEXTS and i < len(types) and types[i] == _CONTROL:
            out.append(i)
    return list(dict.fromkeys(out))


def _is_filler(i: int, text: str) -> bool:
    """``[PADn]`` at id n: padding a converter appended up to the embedding size."""
    return text == f"[PAD{i}]"


def _added_token(i: int, text: str, special: bool) -> dict:
    return {
        "id": i,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _bpe_model(vocab: dict[str, int], merges: list, **kw: Any) -> dict:
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }
    model.update(kw)
    return model


def _split_merges(meta: Mapping[str, Any], source: str) -> list[list[str]]:
    """GGUF ``"a b"`` merges as pairs; llama.cpp splits at the first space after position 0."""
    merges = meta.get("tokenizer.ggml.merges") or []
    _check_list(merges, "tokenizer.ggml.merges", str, "strings", source)
    out = []
    for m in merges:
        pos = m.find(" ", 1)
        if pos < 0:
            raise MlxLoraError(f"{source}: malformed merge {m[:40]!r}; the file is damaged")
        out.append([m[:pos], m[pos + 1 :]])
    return out


def _score_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """Merges that make a BPE behave like llama.cpp's SentencePiece: higher score merges first.

    Every split of a normal token into two normal tokens is a merge; merges are ordered by the
    score of the token they produce (ties: lower ids first).
    """
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == _NORMAL}
    found: list[tuple[float, int, int, str, str]] = []
    for text, i in vocab.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], vocab[left], vocab[right], left, right))
    found.sort()
    return [[left, right] for _, _, _, left, right in found]


def _pre_tokenizer(pre: str, source: str) -> tuple[dict, bool, bool]:
    """(pre_tokenizer definition, ignore_merges, clean_spaces) for a byte-level BPE split name."""
    if pre not in _PRE_ALIASES:
        known = ", ".join(sorted(_PRE_ALIASES))
        raise MlxLoraError(
            f"{source}: pre-tokenizer {pre!r} is not supported by the importer (supported: "
            f"{known}); convert the original Hugging Face model instead"
        )
    name, clean = _PRE_ALIASES[pre]
    steps, ignore_merges, _ = PRE_TOKENIZERS[name]
    parts: list[dict] = []
    use_regex = False
    for i, step in enumerate(steps):
        if step == GPT2_REGEX and i == len(steps) - 1:
            use_regex = True  # what ByteLevel(use_regex=true) splits by
        elif step in (r"\p{N}", r"\p{N}+"):
            parts.append({"type": "Digits", "individual_digits": step == r"\p{N}"})
        else:
            parts.append(
                {
                    "type": "Split",
                    "pattern": {"Regex": step},
                    "behavior": "Isolated",
                    "invert": False,
                }
            )
    parts.append(
        {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": use_regex,
        }
    )
    definition = parts[0] if len(parts) == 1 else {"type": "Sequence", "pretokenizers": parts}
    return definition, bool(ignore_merges), clean


def _post_processor(bos: str | None, eos: str | None, ids: dict[str, int]) -> dict | None:
    """TemplateProcessing that adds BOS/EOS the way the GGUF's add_bos/add_eos flags say."""
    if bos is None and eos is None:
        return None

    def seq(name: str, type_id: int) -> list[dict]:
        items: list[dict] = []
        if bos is not None:
            items.append({"SpecialToken": {"id": bos, "type_id": type_id}})
        items.append({"Sequence": {"id": name, "type_id": type_id}})
        if eos is not None:
            items.append({"SpecialToken": {"id": eos, "type_id": type_id}})
        return items

    special = {}
    for text, key in ((bos, "bos"), (eos, "eos")):
        if text is not None:
            special[text] = {"id": text, "ids": [ids[key]], "tokens": [text]}
    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": special,
    }


def _spm_decoder(strip_space: bool) -> dict:
    steps: list[dict] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if strip_space:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def _token_table(meta: Mapping[str, Any], source: str) -> tuple[list[str], list[int]]:
    tokens = meta.get("tokenizer.ggml.tokens")
    model = meta.get("tokenizer.ggml.model")
    if not tokens or not model:
        raise MlxLoraError(
            f"{source} has no tokenizer (tokenizer.ggml.tokens/model are missing); use a GGUF "
            "converted with its vocabulary"
        )
    _check_list(tokens, "tokenizer.ggml.tokens", str, "strings", source)
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    _check_list(types, "tokenizer.ggml.token_type", int, "integers", source)
    if len(types) != len(tokens):
        raise MlxLoraError(
            f"{source}: {len(tokens)} tokens but {len(types)} token types; the file is damaged"
        )
    return list(tokens), [int(t) for t in types]


def _check_list(value: Any, key: str, kind: type | tuple, what: str, source: str) -> None:
    """A metadata array of ``kind`` values (bools are not numbers here)."""
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise MlxLoraError(
            f"{source}: metadata {key} is not an array of {what}; the file is damaged"
        )


def build_tokenizer(meta: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) rebuilt from a GGUF's ``tokenizer.*`` metadata.

    ``meta`` maps GGUF keys to values; ``source`` names the file in error messages.
    """
    tokens, types = _token_table(meta, source)
    kind = meta["tokenizer.ggml.model"]
    ids = special_ids(meta, len(tokens))
    special_set = set(ids.values())
    added = [
        _added_token(i, t, types[i] in (_CONTROL, _UNKNOWN) or i in special_set)
        for i, t in enumerate(tokens)
        if types[i] in _ADDED and not _is_filler(i, t)
    ]
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = kind == "llama" or pre in _ADD_BOS_BY_DEFAULT
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    clean = False
    if kind == "gpt2":
        definition, ignore_merges, clean = _pre_tokenizer(pre, source)
        vocab = _vocab(tokens)
        merges = _split_merges(meta, source)
        body = {
            "normalizer": None,
            "pre_tokenizer": definition,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": True,
                "use_regex": True,
            },
            "model": _bpe_model(vocab, merges, ignore_merges=ignore_merges),
        }
    elif kind == "llama":
        body = _spm_body(meta, tokens, types, ids, source)
    elif kind == "gemma4":
        body = _gemma4_body(meta, tokens, types, ids, source)
    else:
        raise MlxLoraError(
            f"{source}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level "
            "BPE, llama SentencePiece, gemma4)"
        )
    text = {k: tokens[v] for k, v in ids.items()}
    embedded = _embedded_definition(meta, tokens)
    tok_json = embedded or {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": body["normalizer"],
        "pre_tokenizer": body["pre_tokenizer"],
        "post_processor": _post_processor(
            text.get("bos") if add_bos else None, text.get("eos") if add_eos else None, ids
        ),
        "decoder": body["decoder"],
        "model": body["model"],
    }
    config = _tokenizer_config(meta, text, bool(add_bos), add_eos, clean)
    return tok_json, config


def _embedded_definition(meta: Mapping[str, Any], tokens: list[str]) -> dict | None:
    """tokenizer.json as our exporter embeds it (``tokenizer.huggingface.json``), if it assigns
    every token of the GGUF the same id; it keeps what a GGUF cannot say (e.g. HF's Metaspace
    skips the prefix space before a leading space, llama.cpp always adds one)."""
    text = meta.get(gguf.Keys.Tokenizer.HF_JSON)
    if not isinstance(text, str):
        return None
    try:
        definition = json.loads(text)
        ids = dict(definition["model"]["vocab"])
        ids.update({a["content"]: a["id"] for a in definition.get("added_tokens") or []})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    consistent = all(ids.get(t) == i for i, t in enumerate(tokens) if not _is_filler(i, t))
    return definition if consistent else None


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Every token, added ones included: ``tokenizers`` honours an added token's id only when the
    model's vocabulary has it (otherwise it appends the token after the vocabulary)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not _is_filler(i, t):
            vocab.setdefault(t, i)  # a duplicate text keeps its first id, as llama.cpp does
    return vocab


def _spm_body(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], ids: dict, source: str
) -> dict:
    scores = meta.get("tokenizer.ggml.scores")
    if scores:
        _check_list(scores, "tokenizer.ggml.scores", (int, float), "numbers", source)
    if not scores or len(scores) != len(tokens):
        raise MlxLoraError(
            f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores for every token; "
            "the file is damaged"
        )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    vocab = _vocab(tokens)
    unk = tokens[ids["unk"]] if "unk" in ids else None
    # Not Metaspace: it skips the prefix when the text already starts with a space; llama.cpp
    # (and HF's legacy Llama tokenizer, with these normalizers) always adds it.
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = (
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
        if prefix
        else replace
    )
    return {
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "decoder": _spm_decoder(prefix),
        "model": _bpe_model(
            vocab,
            _score_merges(tokens, types, [float(s) for s in scores]),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        ),
    }


def _gemma4_body(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], ids: dict, source: str
) -> dict:
    vocab = _vocab(tokens)
    merges = _split_merges(meta, source)
    return {
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "[^\\n]+|[\\n]+"},
            "behavior": "Isolated",
            "invert": False,
        },
        "decoder": _spm_decoder(False),
        "model": _bpe_model(
            vocab,
            merges,
            unk_token=tokens[ids["unk"]] if "unk" in ids else None,
            byte_fallback=True,
        ),
    }


def _chat_template(meta: Mapping[str, Any]) -> str | list[dict] | None:
    """tokenizer.chat_template, plus named ones (tokenizer.chat_template.NAME) as HF's list form."""
    default = meta.get("tokenizer.chat_template")
    listed = meta.get("tokenizer.chat_templates")
    names = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
    named = {n: meta.get(f"tokenizer.chat_template.{n}") for n in names}
    named = {n: t for n, t in named.items() if isinstance(t, str)}
    if not named:
        return default if isinstance(default, str) else None
    out = [{"name": "default", "template": default}] if isinstance(default, str) else []
    return out + [{"name": n, "template": t} for n, t in named.items()]


def _tokenizer_config(
    meta: Mapping[str, Any], text: dict[str, str], add_bos: bool, add_eos: bool, clean: bool
) -> dict:
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos", "eos", "unk", "pad"):
        if name in text:
            config[f"{name}_token"] = text[name]
    config.update(
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=clean,
    )
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    if isinstance(ctx, int):
        config["model_max_length"] = ctx
    template = _chat_template(meta)
    if template is not None:
        config["chat_template"] = template
    return config
