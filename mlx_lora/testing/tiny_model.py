#!/usr/bin/env python
"""Build a tiny, randomly initialised chat model in Hugging Face layout, for tests and the demo.

No model hub is reachable from CI machines, yet every stage of mlx_lora (training, fusing, GGUF
export, Ollama templates) must be exercised on a real checkpoint folder, for every model family
users fine-tune. This script writes one in a few seconds: ``--arch`` picks the family (Qwen2 with
q/k/v biases and tied embeddings by default; Qwen3, Llama, Mistral, SmolLM, Gemma 2, Gemma 3
text, Phi-3, OLMo 2, Granite, StarCoder2), each with its HF config.json, HF weight names and shapes
(Gemma's norms stored as offsets for ``1 + w``, Phi-3's fused ``qkv_proj``/``gate_up_proj``), and
the tokenizer kind and chat template its real checkpoints ship: a small byte-level BPE trained here
(Qwen's pre-tokenizer and ChatML, or SmolLM2's digit split with its specials first), or a
SentencePiece BPE trained here with byte fallback and ``▁`` (Gemma's turn tokens and no dummy
prefix; Llama/Mistral's dummy prefix; Phi-3's added role tokens), written as ``tokenizer.model``
plus an equivalent ``tokenizer.json``. ``--tokenizer DIR`` copies an existing tokenizer instead
(e.g. the real Qwen1.5 one).

Usage::

    python -m mlx_lora.testing.tiny_model --out /tmp/tiny [--arch gemma3_text] [--tokenizer
    ../shared/fixtures/qwen15-tokenizer]

Importable too: ``make_tiny_model(Path("/tmp/tiny"), arch="phi3")``. The output is deterministic
for a given seed (same bytes on a rerun) and is written atomically (temp dir next to ``--out``,
then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.testing import SAMPLE_DATA

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen1.5-Chat's ChatML template (a data format): default system prompt when none is given,
# every non-final turn closed with <|im_end|>\n, optional generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
    "{% if (loop.last and add_generation_prompt) or not loop.last %}"
    "{{ '<|im_end|>' + '\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# The chat formats of the other families, written here (data formats, not their vendors' files):
# Qwen3: ChatML without a default system prompt; earlier assistant turns lose their <think> part.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# SmolLM2-Instruct: ChatML, its own default system prompt, every turn closed.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma 2: no system role; the assistant is "model"; turns are <start_of_turn>…<end_of_turn>.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Gemma 3: like Gemma 2, but a system message is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set prefix = messages[0]['content'] + '\n\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3/3.5: <|role|>\n…<|end|>\n, generation prompt <|assistant|>\n, eos after a closed chat.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Mistral v0.3: [INST] … [/INST] answer</s>; a system message goes before the last user turn.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system %}"
    "{{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE,
    "smollm": SMOLLM_TEMPLATE,
    "gemma2": GEMMA2_TEMPLATE,
    "gemma3": GEMMA3_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
}

# Qwen2's pre-tokenizer split pattern. Using it (rather than GPT-2's) keeps the trained
# tokenizer consistent with what transformers' Qwen2Tokenizer and llama.cpp's "qwen2"
# pre-tokenizer do with the same vocabulary (e.g. digits are split one by one).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Files that make up a tokenizer; copied byte for byte with --tokenizer (llama.cpp identifies
# BPE pre-tokenizers by hashing their output, so a "cleaned" copy could change the GGUF).
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
)

TRAINED_BPE_SIZE = 1500  # ordinary tokens (256 bytes + merges); 3 specials come after
TRAINED_SPM_SIZE = 1200  # SentencePiece pieces (specials, 256 byte pieces, characters, merges)

ENGLISH_CORPUS = """\
system
You are a helpful assistant.
You are a helpful assistant
user
assistant
Hello world! How are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. 0123456789
Once upon a time, there was a little girl who lived in a palace with her family.
She liked to read books, write poems and play the zither in the garden.
What is your name? Where do you come from? Please answer in one sentence.
Translate the following sentence into Chinese: the moon is bright tonight.
Fine-tuning a language model with LoRA trains two small matrices per layer.
The learning rate is 1e-4, the batch size is 4 and the model has 2 layers.
def hello(name: str) -> str:
    return f"Hello, {name}!"
{"instruction": "Who are you?", "input": "", "output": "I am Zhen Huan."}
"""


# ------------------------------------------------------------------------- model families
#
# What each --arch writes: the HF class and model_type, the tokenizer kind and chat template of its
# real checkpoints, and the config keys both transformers and mlx-lm 0.32 read (mlx-lm reads some
# keys under their transformers 4.x names, e.g. gemma3_text's rope_local_base_freq and
# sliding_window_pattern, so the configs use those, as the released checkpoints do).


class Family(NamedTuple):
    """One ``--arch``: what its config.json, weights and tokenizer look like."""

    hf_class: str
    model_type: str
    tokenizer: str  # bpe, bpe-smollm, spm-llama, spm-gemma or spm-phi3
    template: str  # a key of TEMPLATES
    tied: bool
    head_dim: int | None = None  # None: hidden // heads
    qkv_bias: bool = False
    qk_norm: str | None = None  # "head" (qwen3, gemma3: per head) or "full" (olmo2: whole q/k)
    gemma_norms: bool = False  # four norms per block, stored as w for a weight of 1 + w
    fused: bool = False  # phi3: qkv_proj and gate_up_proj
    layer_norm: bool = False  # starcoder2: LayerNorm with bias, c_fc/c_proj, biases everywhere
    post_norms_only: bool = False  # olmo2: norms after attention and MLP, none before
    vocab_multiple: int = 128  # embedding rows round up to this (1: exactly the tokenizer)
    legacy_init: bool = False  # qwen2/llama: norms exactly 1 (older tests rely on those bytes)
    qwen_llama_keys: bool = False  # config keys from _qwen_llama_keys (qwen2/qwen3/llama classes)


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        "Qwen2ForCausalLM",
        "qwen2",
        "bpe",
        "chatml",
        tied=True,
        qkv_bias=True,
        legacy_init=True,
        qwen_llama_keys=True,
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        "qwen3",
        "bpe",
        "qwen3",
        tied=True,
        head_dim=32,
        qk_norm="head",
        qwen_llama_keys=True,
    ),
    "llama": Family(
        "LlamaForCausalLM",
        "llama",
        "bpe",
        "chatml",
        tied=False,
        legacy_init=True,
        qwen_llama_keys=True,
    ),
    "mistral": Family(
        "MistralForCausalLM",
        "mistral",
        "spm-llama",
        "mistral",
        tied=False,
        head_dim=32,
        qwen_llama_keys=True,
    ),
    "smollm": Family(
        "LlamaForCausalLM", "llama", "bpe-smollm", "smollm", tied=True, qwen_llama_keys=True
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        "gemma2",
        "spm-gemma",
        "gemma2",
        tied=True,
        head_dim=32,
        gemma_norms=True,
        vocab_multiple=1,
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        "gemma3_text",
        "spm-gemma",
        "gemma3",
        tied=True,
        head_dim=32,
        qk_norm="head",
        gemma_norms=True,
        vocab_multiple=1,
    ),
    "phi3": Family(
        "Phi3ForCausalLM", "phi3", "spm-phi3", "phi3", tied=False, fused=True, vocab_multiple=64
    ),
    "olmo2": Family(
        "Olmo2ForCausalLM",
        "olmo2",
        "bpe",
        "chatml",
        tied=False,
        qk_norm="full",
        post_norms_only=True,
    ),
    "granite": Family("GraniteForCausalLM", "granite", "bpe", "chatml", tied=True),
    "starcoder2": Family(
        "Starcoder2ForCausalLM",
        "starcoder2",
        "bpe",
        "chatml",
        tied=True,
        qkv_bias=True,
        layer_norm=True,
    ),
}
ARCHS = tuple(FAMILIES)
TOKENIZER_KINDS = ("bpe", "bpe-smollm", "spm-llama", "spm-gemma", "spm-phi3")

# Per tokenizer kind: end-of-turn tokens (the first is config.json's eos), bos, pad.
END_TOKENS = {
    "bpe": ([IM_END, ENDOFTEXT], None, ENDOFTEXT),
    "bpe-smollm": ([IM_END], IM_START, IM_END),
    "spm-llama": (["</s>"], "<s>", None),
    "spm-gemma": (["<eos>", "<end_of_turn>"], "<bos>", "<pad>"),
    "spm-phi3": ([ENDOFTEXT, "<|end|>"], "<s>", ENDOFTEXT),
}


def _load_corpus_texts() -> list[str]:
    """Texts to train the tiny BPE on: the packaged dataset sample plus English."""
    texts: list[str] = []
    sample = SAMPLE_DATA
    if sample.is_file():
        try:
            records = json.loads(sample.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            records = []
        if isinstance(records, list):
            for rec in records:
                if not isinstance(rec, dict):
                    continue
                fields = [rec.get(k) for k in ("instruction", "input", "output")]
                if not all(isinstance(f, str) for f in fields):
                    continue
                # Shaped like a rendered ChatML turn, so role names become single tokens.
                instruction, extra, output = fields
                user = f"{instruction}\n{extra}" if extra else instruction
                texts.append(
                    f"system\nYou are a helpful assistant\nuser\n{user}\nassistant\n{output}"
                )
    texts.extend(ENGLISH_CORPUS.splitlines())
    return texts


# ----------------------------------------------------------------------- byte-level BPE


def _train_tokenizer(out_dir: Path, kind: str = "bpe") -> None:
    """Train a small byte-level BPE and write HF tokenizer files.

    ``bpe``: Qwen's pipeline (its split regex, specials after the ordinary tokens, ChatML);
    ``bpe-smollm``: SmolLM2's (digits split, then GPT-2's byte-level regex; specials first).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    smollm = kind == "bpe-smollm"
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if smollm:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=False, use_regex=False
                ),
            ]
        )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_BPE_SIZE + (len(SPECIAL_TOKENS) if smollm else 0),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS) if smollm else [],
    )
    tok.train_from_iterator(_load_corpus_texts(), trainer=trainer)
    # Qwen: specials after the ordinary tokens (endoftext, im_start, im_end); SmolLM2: ids 0-2.
    tok.add_special_tokens(
        [
            AddedToken(
                t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
            )
            for t in SPECIAL_TOKENS
        ]
    )
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    # vocab.json + merges.txt too, like Qwen's repos (the slow/rebuilt path reads these).
    tok.model.save(str(out_dir))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(out_dir / "tokenizer_config.json", _bpe_tokenizer_config(ids, smollm))


def _bpe_tokenizer_config(ids: dict[str, int], smollm: bool) -> dict:
    added = {
        str(ids[t]): _added_token_entry(t, special=True) for t in sorted(ids, key=ids.__getitem__)
    }
    if smollm:
        return {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": IM_START,
            "chat_template": SMOLLM_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": IM_END,
            "model_max_length": 8192,
            "pad_token": IM_END,
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": None,
            "vocab_size": TRAINED_BPE_SIZE + len(SPECIAL_TOKENS),
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _added_token_entry(content: str, special: bool, rstrip: bool = False) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


# ------------------------------------------------------------------ SentencePiece BPE


class _SpmKind(NamedTuple):
    """A SentencePiece tokenizer layout as the family's real checkpoints have it."""

    ids: dict[str, int]  # meta pieces: unk, bos, eos, pad (-1: none)
    pieces: dict[str, str]  # their texts
    control: tuple[str, ...] = ()  # control pieces inside tokenizer.model
    user_defined: tuple[str, ...] = ()  # user-defined pieces inside tokenizer.model
    appended: tuple[tuple[str, bool], ...] = ()  # HF-only added tokens after the pieces (rstrip)
    dummy_prefix: bool = True  # SentencePiece's leading "▁" (Llama, Mistral, Phi-3; not Gemma)
    tokenizer_class: str = "LlamaTokenizer"
    add_bos: bool = True


_LLAMA_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SPM_KINDS = {
    "spm-llama": _SpmKind(
        {"unk": 0, "bos": 1, "eos": 2, "pad": -1}, _LLAMA_PIECES, control=("[INST]", "[/INST]")
    ),
    "spm-gemma": _SpmKind(
        {"pad": 0, "eos": 1, "bos": 2, "unk": 3},
        {"unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
        control=("<mask>",),  # transformers' GemmaTokenizer adds one when the vocabulary has none
        user_defined=("<start_of_turn>", "<end_of_turn>"),
        dummy_prefix=False,
        tokenizer_class="GemmaTokenizer",
    ),
    "spm-phi3": _SpmKind(
        {"unk": 0, "bos": 1, "eos": 2, "pad": -1},
        _LLAMA_PIECES,
        appended=(
            (ENDOFTEXT, False),
            ("<|assistant|>", True),
            ("<|system|>", True),
            ("<|end|>", True),
            ("<|user|>", True),
        ),
        add_bos=False,
    ),
}


def _train_spm_model(kind: _SpmKind) -> bytes:
    """tokenizer.model: a SentencePiece BPE with byte fallback, trained on the tiny corpus."""
    import io

    try:
        import sentencepiece as spm
    except ImportError:
        raise MlxLoraError(
            "SentencePiece tokenizers need the sentencepiece package: pip install sentencepiece"
        ) from None
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_load_corpus_texts()),
        model_writer=model,
        model_type="bpe",
        vocab_size=TRAINED_SPM_SIZE,
        hard_vocab_limit=False,
        character_coverage=0.99,  # rare characters stay byte-fallback sequences
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=kind.dummy_prefix,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        control_symbols=list(kind.control),
        user_defined_symbols=list(kind.user_defined),
        **{f"{k}_id": v for k, v in kind.ids.items()},
        **{f"{k}_piece": kind.pieces[k] for k in kind.ids},
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _spm_merges(vocab: dict[str, int], normal: set[str]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of an ordinary piece into two
    pieces, ranked by the piece's id (SentencePiece orders pieces by merge priority)."""
    merges = []
    for piece in sorted(normal, key=vocab.__getitem__):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        found = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += sorted(found, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    return merges


def _spm_tokenizer_json(model_proto: bytes, kind: _SpmKind):
    """The tokenizers.Tokenizer equivalent of the SentencePiece model (tokenizer.json)."""
    import sentencepiece as spm
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
    )

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in kind.user_defined
    ]
    normal = {p for p, i in vocab.items() if p not in special and not sp.is_byte(i)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(vocab, normal),
            unk_token=kind.pieces["unk"],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind.dummy_prefix:
        # As Llama-2/Mistral v0.1 ship it (legacy): every text segment, also one right after a
        # special token, gets the "▁" prefix, which is exactly what llama.cpp's add_space_prefix
        # does (a Metaspace pre-tokenizer would skip segments already starting with a space).
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    for text, rstrip in kind.appended:
        tok.add_special_tokens([AddedToken(text, normalized=False, special=True, rstrip=rstrip)])
    if kind.add_bos:
        bos = kind.pieces["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tok


def _train_spm_tokenizer(out_dir: Path, kind_name: str, template: str) -> None:
    """tokenizer.model + tokenizer.json + tokenizer_config.json of a SentencePiece family."""
    kind = SPM_KINDS[kind_name]
    proto = _train_spm_model(kind)
    (out_dir / "tokenizer.model").write_bytes(proto)
    tok = _spm_tokenizer_json(proto, kind)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    rstrip = dict(kind.appended)
    added = {
        str(i): _added_token_entry(t.content, special=True, rstrip=rstrip.get(t.content, False))
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    eos = END_TOKENS[kind_name][0][0]
    config = {
        "add_bos_token": kind.add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": kind.pieces["bos"],
        "chat_template": TEMPLATES[template],
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "legacy": True,
        "model_max_length": 32768,
        "pad_token": END_TOKENS[kind_name][2],
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": kind.tokenizer_class,
        "unk_token": kind.pieces["unk"],
        "use_default_system_prompt": False,
    }
    _write_json(out_dir / "tokenizer_config.json", config)


def _copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` byte for byte; return the names copied."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise MlxLoraError(
            f"no tokenizer files in {src}: expected some of {', '.join(TOKENIZER_FILES)}; "
            "pass --tokenizer a folder holding a Hugging Face tokenizer"
        )
    for name in copied:
        shutil.copyfile(src / name, out_dir / name)
    return copied


def _tokenizer_facts(tok_dir: Path, kind: str | None = None) -> dict:
    """Length and special-token ids of the tokenizer in ``tok_dir`` (as transformers loads it).

    ``kind``: the tokenizer kind written here (its end/bos/pad tokens are known); None for a
    copied tokenizer, whose ChatML tokens are used when present, else its own eos/bos/pad.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = tok.get_vocab()
    if kind is not None:
        ends, bos_text, pad_text = END_TOKENS[kind]
        eos_ids = [vocab[t] for t in ends]
        bos = vocab.get(bos_text) if bos_text else vocab.get(ENDOFTEXT)
        pad = vocab.get(pad_text) if pad_text else None
    else:
        endoftext = vocab.get(ENDOFTEXT)
        im_end = vocab.get(IM_END)
        eos = im_end if im_end is not None else tok.eos_token_id
        bos = tok.bos_token_id if tok.bos_token_id is not None else endoftext
        pad = endoftext if endoftext is not None else tok.pad_token_id
        eos_ids = list(dict.fromkeys(i for i in (eos, endoftext) if i is not None))
    if not eos_ids:
        raise MlxLoraError(
            f"tokenizer in {tok_dir} defines no end-of-sequence token; "
            "use a tokenizer with eos_token set (or <|im_end|>)"
        )
    return {
        "len": max(len(tok), max(vocab.values()) + 1),
        "eos": eos_ids[0],
        "eos_ids": eos_ids,
        "bos": bos,
        "pad": pad,
    }


def _padded_vocab_size(n_tokens: int, tok_src: Path | None, multiple: int = 128) -> int:
    """Embedding rows: the tokenizer's companion config if it fits, else round up to ``multiple``.

    Real checkpoints pad the embedding past the tokenizer (Qwen1.5: 151,646 tokens, 151,936 rows;
    Phi-3: 32,011 and 32,064; Gemma: none); keeping that gap exercises the code paths (GGUF
    padding, logits slicing) that depend on it.
    """
    if tok_src is not None and (tok_src / "config.json").is_file():
        try:
            size = json.loads((tok_src / "config.json").read_text(encoding="utf-8")).get(
                "vocab_size"
            )
        except (OSError, ValueError):
            size = None
        if isinstance(size, int) and size >= n_tokens:
            return size
    return -(-n_tokens // multiple) * multiple


# ------------------------------------------------------------------------ config.json


class Dims(NamedTuple):
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    head_dim: int
    tied: bool  # one matrix for the embedding and the output head


def _common_config(fam: Family, d: Dims, facts: dict) -> dict:
    return {
        "architectures": [fam.hf_class],
        "model_type": fam.model_type,
        "attention_dropout": 0.0,
        "bos_token_id": facts["bos"],
        "eos_token_id": facts["eos"],
        "hidden_act": "silu",
        "hidden_size": d.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate_size,
        "max_position_embeddings": 32768,
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": d.tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": d.vocab_size,
    }


def _llama_keys(d: Dims) -> dict:
    return {
        "attention_bias": False,
        "head_dim": d.head_dim,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
    }


def _qwen_llama_keys(arch: str, d: Dims, pad: dict) -> dict:
    if arch == "qwen2":
        return {"max_window_layers": d.layers, "sliding_window": 32768, "use_sliding_window": False}
    if arch == "qwen3":
        return {
            "attention_bias": False,
            "head_dim": d.head_dim,
            "max_position_embeddings": 40960,
            "max_window_layers": d.layers,
            "rope_scaling": None,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    if arch == "mistral":
        return {"head_dim": d.head_dim, "rms_norm_eps": 1e-05, "sliding_window": None}
    llama = {
        "attention_bias": False,
        "head_dim": d.head_dim,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
    }
    if arch == "smollm":  # SmolLM2's choices: tied head, rope base 1e5, eps 1e-5, 8k context
        llama.update(pad, max_position_embeddings=8192, rms_norm_eps=1e-05, rope_theta=100000.0)
    return llama


def _gemma_keys(arch: str, d: Dims, pad: dict) -> dict:
    """Gemma 2: its released soft-capping values and 4k window (mlx-lm has no window for it).
    Gemma 3: a 16-token window and a global layer every second one, so a short prompt already
    crosses the window and both rope bases (local 1e4; global 1e6 with linear x8) are used."""
    common = {
        **pad,
        "attention_bias": False,
        "head_dim": d.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": d.head_dim,
    }
    if arch == "gemma2":
        return {
            **common,
            "attn_logit_softcapping": 50.0,
            "cache_implementation": "hybrid",
            "final_logit_softcapping": 30.0,
            "max_position_embeddings": 8192,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
        }
    return {
        **common,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "layer_types": [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(d.layers)
        ],
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 16,
        "sliding_window_pattern": 2,
    }


def _other_keys(arch: str, d: Dims, pad: dict) -> dict:
    if arch == "phi3":  # Phi-3-mini-4k's shape: no rope scaling, a 2047-token window
        return {
            **pad,
            "attention_bias": False,
            "embd_pdrop": 0.0,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "sliding_window": 2047,
        }
    if arch == "olmo2":
        return {
            **pad,
            "attention_bias": False,
            "max_position_embeddings": 4096,
            "rope_scaling": None,
            "rope_theta": 500000.0,
        }
    if arch == "granite":
        return {
            "attention_bias": False,
            "attention_multiplier": 1.0 / d.head_dim,
            "embedding_multiplier": 12.0,
            "logits_scaling": 8.0,
            "mlp_bias": False,
            "residual_multiplier": 0.22,
            "rope_scaling": None,
            "rope_theta": 10000.0,
        }
    return {  # starcoder2
        "embedding_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "mlp_type": "default",
        "norm_epsilon": 1e-05,
        "residual_dropout": 0.0,
        "rope_theta": 100000.0,
        "sliding_window": 4096,
        "use_bias": True,
    }


def _model_config(arch: str, d: Dims, facts: dict, overrides: dict | None = None) -> dict:
    fam = FAMILIES[arch]
    pad = {"pad_token_id": facts["pad"]} if facts["pad"] is not None else {}
    if fam.qwen_llama_keys:
        keys = _qwen_llama_keys(arch, d, pad)
    elif fam.gemma_norms:
        keys = _gemma_keys(arch, d, pad)
    else:
        keys = _other_keys(arch, d, pad)
    cfg = {**_common_config(fam, d, facts), **keys}
    if arch == "starcoder2":
        cfg.pop("rms_norm_eps")
    cfg.update(overrides or {})
    return dict(sorted(cfg.items()))


# ------------------------------------------------------------------------------ weights


def _block_shapes(fam: Family, d: Dims, p: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) of one decoder block with prefix ``p``."""
    D, ff, hd = d.hidden_size, d.intermediate_size, d.head_dim  # noqa: N806
    q_out, kv_out = d.heads * hd, d.kv_heads * hd
    norm = "norm_bias" if fam.layer_norm else "norm"
    out: list[tuple[str, tuple[int, ...], str]] = []
    if not fam.post_norms_only:
        out.append((p + "input_layernorm.weight", (D,), norm))
    if fam.fused:
        out.append((p + "self_attn.qkv_proj.weight", (q_out + 2 * kv_out, D), "matrix"))
    else:
        out += [
            (p + "self_attn.q_proj.weight", (q_out, D), "matrix"),
            (p + "self_attn.k_proj.weight", (kv_out, D), "matrix"),
            (p + "self_attn.v_proj.weight", (kv_out, D), "matrix"),
        ]
    if fam.qkv_bias:
        out += [
            (p + "self_attn.q_proj.bias", (q_out,), "bias"),
            (p + "self_attn.k_proj.bias", (kv_out,), "bias"),
            (p + "self_attn.v_proj.bias", (kv_out,), "bias"),
        ]
    if fam.qk_norm:
        full = fam.qk_norm == "full"
        out += [
            (p + "self_attn.q_norm.weight", (q_out if full else hd,), "norm"),
            (p + "self_attn.k_norm.weight", (kv_out if full else hd,), "norm"),
        ]
    out.append((p + "self_attn.o_proj.weight", (D, q_out), "matrix"))
    if fam.layer_norm:
        out.append((p + "self_attn.o_proj.bias", (D,), "bias"))
    out.append((p + "post_attention_layernorm.weight", (D,), norm))
    if fam.gemma_norms:
        out.append((p + "pre_feedforward_layernorm.weight", (D,), "norm"))
    if fam.post_norms_only or fam.gemma_norms:
        out.append((p + "post_feedforward_layernorm.weight", (D,), "norm"))
    if fam.fused:
        out.append((p + "mlp.gate_up_proj.weight", (2 * ff, D), "matrix"))
    elif fam.layer_norm:
        out += [
            (p + "mlp.c_fc.weight", (ff, D), "matrix"),
            (p + "mlp.c_fc.bias", (ff,), "bias"),
            (p + "mlp.c_proj.weight", (D, ff), "matrix"),
            (p + "mlp.c_proj.bias", (D,), "bias"),
        ]
        return out
    else:
        out += [
            (p + "mlp.gate_proj.weight", (ff, D), "matrix"),
            (p + "mlp.up_proj.weight", (ff, D), "matrix"),
        ]
    out.append((p + "mlp.down_proj.weight", (D, ff), "matrix"))
    return out


def _weight_shapes(arch: str, d: Dims) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) for every weight, in a fixed order."""
    fam = FAMILIES[arch]
    out = [("model.embed_tokens.weight", (d.vocab_size, d.hidden_size), "matrix")]
    for i in range(d.layers):
        out += _block_shapes(fam, d, f"model.layers.{i}.")
    out.append(("model.norm.weight", (d.hidden_size,), "norm_bias" if fam.layer_norm else "norm"))
    if not d.tied:
        out.append(("lm_head.weight", (d.vocab_size, d.hidden_size), "matrix"))
    return out


CHUNK_VALUES = 1 << 24  # values drawn at once: a 4B-shaped model is written in bounded memory


def _init_values(arch: str, d: Dims, seed: int, init: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 values) in :func:`_weight_shapes` order, large matrices in row chunks (the
    same numbers as one draw: the generator's stream is consumed in order).

    Matrices: normal(0, 0.02) (embeddings and lm_head: 1/sqrt(hidden), unit-norm rows), small
    nonzero biases; norms 1 for qwen2/llama, else 1 + N(0, 0.1) (Gemma: the offset, N(0, 0.1)),
    so a norm written to GGUF without its offset or with the wrong one cannot go unseen."""
    fam = FAMILIES[arch]
    rng = np.random.default_rng(seed)
    for name, shape, kind in _weight_shapes(arch, d):
        if kind in ("norm", "norm_bias"):
            if fam.legacy_init:
                yield name, np.ones(shape, dtype=np.float32)
            else:
                base = 0.0 if fam.gemma_norms else 1.0
                yield name, (base + rng.normal(0.0, 0.1, size=shape)).astype(np.float32)
            if kind == "norm_bias":
                bias = rng.normal(0.0, 0.01, size=shape).astype(np.float32)
                yield name.removesuffix(".weight") + ".bias", bias
            continue
        if kind == "bias":  # small but nonzero, so bias handling is exercised
            yield name, rng.normal(0.0, 0.01, size=shape).astype(np.float32)
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            # unit-norm rows: logits span a useful range, so fine-tuning visibly lowers the loss
            std = 1.0 / np.sqrt(d.hidden_size)
        else:
            # small: N(0, 0.02) like HF's initializer_range. fan_in: N(0, 1/fan_in), so activations
            # keep their scale and a LoRA can steer the model within seconds (the demo uses it).
            std = 0.02 if init == "small" else 1.0 / np.sqrt(shape[-1])
        rows = max(1, CHUNK_VALUES // int(np.prod(shape[1:], dtype=np.int64)))
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            yield name, rng.normal(0.0, std, size=(n, *shape[1:])).astype(np.float32)


def _tensor_shapes(arch: str, d: Dims) -> dict[str, tuple[int, ...]]:
    """Every tensor the file holds (a norm with a bias is two), by name."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape, kind in _weight_shapes(arch, d):
        out[name] = shape
        if kind == "norm_bias":
            out[name.removesuffix(".weight") + ".bias"] = shape
    return out


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    values: Iterable[tuple[str, np.ndarray]],
    dtype: str = "bfloat16",
) -> None:
    """Write bf16 (or f32) safetensors with metadata {"format": "pt"}, keys sorted, deterministic
    bytes, one chunk in memory at a time.

    numpy has no bfloat16, so ``safetensors.numpy`` cannot write one; the format is a JSON header
    plus raw little-endian data, simple enough to emit directly. ``values`` yields (name, rows)
    chunks in any tensor order; each chunk is written at its tensor's offset.
    """
    width = 2 if dtype == "bfloat16" else 4
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    offset = 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64)) * width
        header[name] = {
            "dtype": "BF16" if width == 2 else "F32",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offsets[name] = offset
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(start + offset)
        last = None
        for name, x in values:
            if name != last:
                f.seek(start + offsets[name])
                last = name
            f.write((_to_bf16_bits(x).astype("<u2") if width == 2 else x.astype("<f4")).tobytes())


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MlxLoraError(f"--out {out} is a file, not a folder; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MlxLoraError(
            f"--out {out} is not empty; pass --force to replace it or choose another folder"
        )


def _check_args(
    arch: str,
    init: str,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate_size: int,
    tokenizer_kind: str | None,
    dtype: str = "bfloat16",
) -> None:
    if init not in ("small", "fan_in"):
        raise MlxLoraError(f"--init {init!r} is not supported; use small or fan_in")
    if dtype not in ("bfloat16", "float32"):
        raise MlxLoraError(f"--dtype {dtype!r} is not supported; use bfloat16 or float32")
    if arch not in FAMILIES:
        raise MlxLoraError(f"--arch {arch!r} is not supported; use one of {', '.join(ARCHS)}")
    if tokenizer_kind is not None and tokenizer_kind not in TOKENIZER_KINDS:
        raise MlxLoraError(
            f"--tokenizer-kind {tokenizer_kind!r} is not supported; use one of "
            f"{', '.join(TOKENIZER_KINDS)}"
        )
    if heads <= 0 or kv_heads <= 0 or hidden_size % heads or heads % kv_heads:
        raise MlxLoraError(
            f"hidden size {hidden_size}, heads {heads}, kv heads {kv_heads} do not fit: "
            "hidden size must divide by heads and heads by kv heads"
        )
    if min(hidden_size, layers, intermediate_size) <= 0:
        raise MlxLoraError("--hidden-size, --layers and --intermediate-size must be positive")


def _write_tokenizer(
    tmp: Path, arch: str, tokenizer: Path | None, tokenizer_kind: str | None
) -> str | None:
    """Tokenizer files into ``tmp``; returns the kind written here (None: copied)."""
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, tmp)
        return None
    fam = FAMILIES[arch]
    kind = tokenizer_kind or fam.tokenizer
    if kind.startswith("spm"):
        _train_spm_tokenizer(tmp, kind, fam.template)
    else:
        _train_tokenizer(tmp, kind)
        if fam.template != ("smollm" if kind == "bpe-smollm" else "chatml"):
            path = tmp / "tokenizer_config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config["chat_template"] = TEMPLATES[fam.template]
            _write_json(path, config)
    return kind


def make_tiny_model(
    out: Path,
    tokenizer: Path | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    arch: str = "qwen2",
    force: bool = False,
    init: str = "small",
    tokenizer_kind: str | None = None,
    head_dim: int | None = None,
    config_overrides: dict | None = None,
    vocab_size: int | None = None,
    dtype: str = "bfloat16",
    tied: bool | None = None,
) -> Path:
    """Write a tiny random model + tokenizer to ``out`` and return ``out``.

    ``arch``: one of :data:`ARCHS`; ``tokenizer_kind`` overrides the family's own (e.g. spm-llama
    for a llama model llama.cpp's converter can read); ``head_dim`` overrides the family's;
    ``config_overrides`` replaces config.json keys (tests use it for e.g. soft-capping values);
    ``vocab_size`` pads the embedding past the tokenizer (a real model's row count); ``dtype``
    float32 writes fp32 weights (benchmarks: both tools then compute in fp32 on a CPU);
    ``tied`` overrides the family's tied head (Qwen1.5-4B's is untied). Large matrices are
    written in row chunks, so a real model's shape (several GB) is written in bounded memory.
    All random values come from ``numpy.random.default_rng(seed)`` (see :func:`_init_values`).
    Raises MlxLoraError for bad arguments or a non-empty ``out`` without ``force``.
    """
    out = Path(out)
    _check_args(
        arch, init, hidden_size, layers, heads, kv_heads, intermediate_size, tokenizer_kind, dtype
    )
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_dir():
            raise MlxLoraError(f"--tokenizer {tokenizer} is not a folder; pass a tokenizer folder")
    _check_out(out, force)
    fam = FAMILIES[arch]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        kind = _write_tokenizer(tmp, arch, tokenizer, tokenizer_kind)
        facts = _tokenizer_facts(tmp, kind)
        if vocab_size is not None and vocab_size < facts["len"]:
            raise MlxLoraError(
                f"--vocab-size {vocab_size} is smaller than the tokenizer ({facts['len']} "
                "tokens); pass at least that"
            )
        vocab_size = vocab_size or _padded_vocab_size(facts["len"], tokenizer, fam.vocab_multiple)
        hd = head_dim or fam.head_dim or hidden_size // heads
        tie = fam.tied if tied is None else tied
        dims = Dims(vocab_size, hidden_size, layers, heads, kv_heads, intermediate_size, hd, tie)
        overrides = {**({"torch_dtype": "float32"} if dtype == "float32" else {})}
        overrides.update(config_overrides or {})
        _write_json(tmp / "config.json", _model_config(arch, dims, facts, overrides))
        _write_json(tmp / "generation_config.json", _generation_config(facts))
        values = _init_values(arch, dims, seed, init)
        _write_safetensors(tmp / "model.safetensors", _tensor_shapes(arch, dims), values, dtype)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _generation_config(facts: dict) -> dict:
    gen = {
        "bos_token_id": facts["bos"],
        "do_sample": True,
        "eos_token_id": facts["eos_ids"],
        "pad_token_id": facts["pad"],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }
    return {k: v for k, v in gen.items() if v is not None}


def _swap_into_place(tmp: Path, out: Path) -> None:
    """The old folder (if any) is only removed once the new one is complete."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def parameter_count(model_dir: Path) -> int:
    """Number of weights in ``model_dir/model.safetensors`` (read from the header only)."""
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(
        int(np.prod(v["shape"], dtype=np.int64)) for k, v in header.items() if k != "__metadata__"
    )


# Real models' shapes, for benchmarks that must run deep stacks without downloading weights:
# ``--config smollm2-135m`` builds a random model of that shape (speed does not depend on values).
PRESETS: dict[str, dict] = {
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M-Instruct: llama blocks, tied head, rope 1e5
        "arch": "smollm",
        "hidden_size": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "intermediate_size": 1536,
        "head_dim": 64,
        "vocab_size": 49152,
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct: q/k/v biases, tied head
        "arch": "qwen2",
        "hidden_size": 896,
        "layers": 24,
        "heads": 14,
        "kv_heads": 2,
        "intermediate_size": 4864,
        "head_dim": 64,
        "vocab_size": 151936,
    },
}
_SHAPE_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "intermediate_size": "intermediate_size",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}
_CONFIG_KEYS = ("rope_theta", "rms_norm_eps", "max_position_embeddings")


def shape_from_config(config: str | Path | dict) -> dict:
    """:func:`make_tiny_model` keyword arguments from a preset name, or a real model's config.json
    (its path or dict): the family, the shape, and rope/norm settings as config overrides."""
    if not isinstance(config, dict) and str(config) in PRESETS:
        return dict(PRESETS[str(config)])
    cfg = config
    if not isinstance(cfg, dict):
        try:
            cfg = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MlxLoraError(
                f"--config {config}: not a preset ({', '.join(PRESETS)}) nor a readable "
                f"config.json ({e}); pass one of those"
            ) from None
    arch = cfg.get("model_type")
    if arch == "llama" and cfg.get("tie_word_embeddings"):
        arch = "smollm"  # the tied llama family
    if arch not in FAMILIES:
        raise MlxLoraError(f"--config: model_type {arch!r} is not one of {', '.join(ARCHS)}")
    out = {arg: cfg[key] for key, arg in _SHAPE_KEYS.items() if cfg.get(key) is not None}
    if cfg.get("tie_word_embeddings") is not None and arch not in ("llama", "smollm"):
        out["tied"] = bool(cfg["tie_word_embeddings"])  # llama's tie is its family (smollm)
    overrides = {k: cfg[k] for k in _CONFIG_KEYS if cfg.get(k) is not None}
    return {"arch": arch, **out, **({"config_overrides": overrides} if overrides else {})}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MlxLoraError(f"--set {item!r}: use KEY=JSON, e.g. --set sliding_window=4096")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--arch", choices=ARCHS, help="model family (default: qwen2, or --config's)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="copy this tokenizer folder")
    ap.add_argument(
        "--tokenizer-kind",
        choices=TOKENIZER_KINDS,
        default=None,
        help="tokenizer to train (default: the family's own kind)",
    )
    ap.add_argument(
        "--config",
        help=f"the shape of a preset ({', '.join(PRESETS)}) or of a config.json; the shape "
        "flags override it",
    )
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int, default=None, help="default: the family's own")
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--vocab-size", type=int, help="embedding rows (>= the tokenizer's size)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a config.json key (repeatable)",
    )
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument(
        "--init",
        choices=("small", "fan_in"),
        default="small",
        help="weight init: small = N(0, 0.02); fan_in = N(0, 1/fan_in), learns visibly in seconds",
    )
    args = ap.parse_args(argv)
    try:
        shape = {"arch": "qwen2", "hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2}
        shape["intermediate_size"] = 128
        if args.config:
            shape |= shape_from_config(args.config)
        if args.arch:
            shape["arch"] = args.arch
        flags = ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "head_dim")
        shape |= {k: getattr(args, k) for k in (*flags, "vocab_size") if getattr(args, k)}
        overrides = {**shape.pop("config_overrides", {}), **_parse_set(args.set)}
        out = make_tiny_model(
            args.out,
            tokenizer=args.tokenizer,
            seed=args.seed,
            init=args.init,
            force=args.force,
            tokenizer_kind=args.tokenizer_kind,
            config_overrides=overrides,
            dtype=args.dtype,
            **shape,
        )
    except MlxLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}")
    print(f"parameters: {parameter_count(out):,} ({shape['arch']}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
