#!/usr/bin/env python
"""Build a tiny, randomly initialised chat model in Hugging Face layout, for tests and the demo.

No model hub is reachable from CI machines, yet every stage of mlx_lora (training, fusing, GGUF
export, Ollama templates) must be exercised on a real checkpoint folder. This script writes one in a
few seconds: a Qwen2-architecture model (what Qwen1.5-Chat is) with q/k/v biases and tied
embeddings, or a Llama-architecture model with a separate ``lm_head`` (``--arch llama``), plus
either a copy of an existing tokenizer (``--tokenizer DIR``, e.g. the real Qwen1.5 one) or a small
byte-level BPE trained here with Qwen's pre-tokenizer, special tokens and ChatML template.

Usage::

    python scripts/make_tiny_model.py --out /tmp/tiny [--tokenizer
    ../shared/fixtures/qwen15-tokenizer]

Importable too: ``make_tiny_model(Path("/tmp/tiny"))``. The output is deterministic for a given
seed (same bytes on a rerun) and is written atomically (temp dir next to ``--out``, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from mlx_lora.errors import MlxLoraError  # noqa: E402

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


def _load_corpus_texts(repo_root: Path) -> list[str]:
    """Texts to train the tiny BPE on: the repo's dataset sample (if present) plus English."""
    texts: list[str] = []
    sample = repo_root / "dataset" / "huanhuan.json"
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


def _train_tokenizer(out_dir: Path, repo_root: Path) -> None:
    """Train a small byte-level BPE with Qwen's pipeline and write HF tokenizer files."""
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

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_BPE_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_load_corpus_texts(repo_root), trainer=trainer)
    # Specials go after the ordinary tokens, as in Qwen (endoftext, im_start, im_end).
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
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
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
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


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


def _tokenizer_facts(tok_dir: Path) -> dict:
    """Length and special-token ids of the tokenizer in ``tok_dir`` (as transformers loads it)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = tok.get_vocab()
    endoftext = vocab.get(ENDOFTEXT)
    im_end = vocab.get(IM_END)
    eos = im_end if im_end is not None else tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else endoftext
    pad = endoftext if endoftext is not None else tok.pad_token_id
    eos_ids = [i for i in (eos, endoftext) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))  # unique, order kept
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


def _padded_vocab_size(n_tokens: int, tok_src: Path | None) -> int:
    """Embedding rows: the tokenizer's companion config if it fits, else round up to 128.

    Real checkpoints pad the embedding past the tokenizer (Qwen1.5: 151,646 tokens, 151,936 rows);
    keeping that gap exercises the code paths (GGUF padding, logits slicing) that depend on it.
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
    return -(-n_tokens // 128) * 128


def _model_config(
    arch: str,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate_size: int,
    facts: dict,
) -> dict:
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": facts["bos"],
        "eos_token_id": facts["eos"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 32768,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if arch == "qwen2":
        cfg = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common,
            "max_window_layers": layers,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        }
    else:
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "attention_bias": False,
            "head_dim": hidden_size // heads,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "tie_word_embeddings": False,
        }
    return dict(sorted(cfg.items()))


def _weight_shapes(
    arch: str,
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate_size: int,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF tensor name, shape, init kind) for every weight, in a fixed order."""
    head_dim = hidden_size // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab_size, hidden_size), "matrix")
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden_size,), "norm"),
            (p + "self_attn.q_proj.weight", (q_out, hidden_size), "matrix"),
            (p + "self_attn.k_proj.weight", (kv_out, hidden_size), "matrix"),
            (p + "self_attn.v_proj.weight", (kv_out, hidden_size), "matrix"),
        ]
        if arch == "qwen2":
            out += [
                (p + "self_attn.q_proj.bias", (q_out,), "bias"),
                (p + "self_attn.k_proj.bias", (kv_out,), "bias"),
                (p + "self_attn.v_proj.bias", (kv_out,), "bias"),
            ]
        out += [
            (p + "self_attn.o_proj.weight", (hidden_size, q_out), "matrix"),
            (p + "post_attention_layernorm.weight", (hidden_size,), "norm"),
            (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size), "matrix"),
            (p + "mlp.up_proj.weight", (intermediate_size, hidden_size), "matrix"),
            (p + "mlp.down_proj.weight", (hidden_size, intermediate_size), "matrix"),
        ]
    out.append(("model.norm.weight", (hidden_size,), "norm"))
    if arch == "llama":
        out.append(("lm_head.weight", (vocab_size, hidden_size), "matrix"))
    return out


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write bf16 safetensors with metadata {"format": "pt"}, keys sorted, deterministic bytes.

    numpy has no bfloat16, so ``safetensors.numpy`` cannot write one; the format is a JSON header
    plus raw little-endian data, simple enough to emit directly.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        data = _to_bf16_bits(tensors[name]).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MlxLoraError(f"--out {out} is a file, not a folder; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MlxLoraError(
            f"--out {out} is not empty; pass --force to replace it or choose another folder"
        )


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
) -> Path:
    """Write a tiny random model + tokenizer to ``out`` and return ``out``.

    Weights: normal(0, 0.02) matrices (embeddings and lm_head: 1/sqrt(hidden), unit-norm rows),
    ones for RMSNorm weights, small nonzero biases (so bias
    handling in LoRA/fuse/GGUF is really exercised), all from ``numpy.random.default_rng(seed)``.
    Raises MlxLoraError for bad arguments or a non-empty ``out`` without ``force``.
    """
    out = Path(out)
    if init not in ("small", "fan_in"):
        raise MlxLoraError(f"--init {init!r} is not supported; use small or fan_in")
    if arch not in ("qwen2", "llama"):
        raise MlxLoraError(f"--arch {arch!r} is not supported; use qwen2 or llama")
    if heads <= 0 or kv_heads <= 0 or hidden_size % heads or heads % kv_heads:
        raise MlxLoraError(
            f"hidden size {hidden_size}, heads {heads}, kv heads {kv_heads} do not fit: "
            "hidden size must divide by heads and heads by kv heads"
        )
    if min(hidden_size, layers, intermediate_size) <= 0:
        raise MlxLoraError("--hidden-size, --layers and --intermediate-size must be positive")
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_dir():
            raise MlxLoraError(f"--tokenizer {tokenizer} is not a folder; pass a tokenizer folder")
    _check_out(out, force)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if tokenizer is None:
            _train_tokenizer(tmp, REPO_ROOT)
        else:
            _copy_tokenizer(tokenizer, tmp)
        facts = _tokenizer_facts(tmp)
        vocab_size = _padded_vocab_size(facts["len"], tokenizer)
        dims = (vocab_size, hidden_size, layers, heads, kv_heads, intermediate_size)

        _write_json(tmp / "config.json", _model_config(arch, *dims, facts))
        generation_config = {
            "bos_token_id": facts["bos"],
            "do_sample": True,
            "eos_token_id": facts["eos_ids"],
            "pad_token_id": facts["pad"],
            "repetition_penalty": 1.05,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
        }
        generation_config = {k: v for k, v in generation_config.items() if v is not None}
        _write_json(tmp / "generation_config.json", generation_config)

        rng = np.random.default_rng(seed)
        tensors: dict[str, np.ndarray] = {}
        for name, shape, kind in _weight_shapes(arch, *dims):
            if kind == "norm":
                tensors[name] = np.ones(shape, dtype=np.float32)
            elif kind == "bias":  # small but nonzero, so bias handling is exercised
                tensors[name] = rng.normal(0.0, 0.01, size=shape).astype(np.float32)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                # unit-norm rows: logits span a useful range, so fine-tuning visibly lowers the loss
                std = 1.0 / np.sqrt(hidden_size)
                tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
            else:
                # small: N(0, 0.02) like HF's initializer_range. fan_in: N(0, 1/fan_in), so
                # activations
                # keep their scale and a LoRA can steer the model within seconds (the demo uses it).
                std = 0.02 if init == "small" else 1.0 / np.sqrt(shape[-1])
                tensors[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
        _write_bf16_safetensors(tmp / "model.safetensors", tensors)

        # Swap into place: the old folder (if any) is only removed once the new one is complete.
        old: Path | None = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parameter_count(model_dir: Path) -> int:
    """Number of weights in ``model_dir/model.safetensors`` (read from the header only)."""
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(
        int(np.prod(v["shape"], dtype=np.int64)) for k, v in header.items() if k != "__metadata__"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="copy this tokenizer folder")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=("qwen2", "llama"), default="qwen2")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument(
        "--init",
        choices=("small", "fan_in"),
        default="small",
        help="weight init: small = N(0, 0.02); fan_in = N(0, 1/fan_in), learns visibly in seconds",
    )
    args = ap.parse_args(argv)
    try:
        out = make_tiny_model(
            args.out,
            tokenizer=args.tokenizer,
            hidden_size=args.hidden_size,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            seed=args.seed,
            init=args.init,
            arch=args.arch,
            force=args.force,
        )
    except MlxLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}")
    print(f"parameters: {parameter_count(out):,} ({args.arch}, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
