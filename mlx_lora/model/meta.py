"""What a model folder (and an adapter) say about how the model is to be used.

Chat, serve, the GGUF writer, the Modelfile and verify must agree on three things, or the model
Ollama serves behaves unlike the one you trained: the end tokens generation stops on, the sampling
defaults of ``generation_config.json``, and the system prompt used in training. Each is decided
here, once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json
from mlx_lora.model.prompt import end_of_turn, has_chat_template, hf_tokenizer

GENERATION_CONFIG = "generation_config.json"
FUSED_INFO = "mlx_lora.json"  # written by fuse: provenance and the training system prompt

# End tokens of the ChatML family (Qwen, Yi, SmolLM, ...), stopped on whenever the vocabulary has
# them as special tokens: Qwen's <|endoftext|> ends documents, and some models' configs omit it.
CHATML_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Tokens llama.cpp treats as end of generation by their text (besides the eos/eot/eom ids).
END_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<EOT>",
)

# generation_config.json key → kind of number; these are the sampling settings every consumer knows.
_SAMPLING_KEYS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
}


# config.json keys that hold how many positions the model was trained for, in the order read.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DEFAULT_CONTEXT = 4096  # a config that names none (rare): what llama.cpp assumes too


def context_length(config: dict) -> int:
    """Prompt + answer tokens the model can attend over: ``config.json``'s
    ``max_position_embeddings`` (or its older names, or the text model's in a multimodal config).
    Serve caps ``max_tokens`` with it and refuses longer prompts."""
    for c in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = c.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return DEFAULT_CONTEXT


def generation_config(model_dir: Path) -> dict:
    """``generation_config.json`` of a model folder, ``{}`` when it has none."""
    return read_json(Path(model_dir) / GENERATION_CONFIG)


def sampling_defaults(gen: dict) -> dict[str, float | int]:
    """The model authors' sampling settings, by their Hugging Face names.

    As in transformers, ``do_sample: false`` means greedy decoding, i.e. temperature 0. A value
    that is not a finite non-negative number (or a whole number for ``top_k``) is a broken file.
    """
    if not isinstance(gen, dict):
        raise MlxLoraError(f"{GENERATION_CONFIG} must hold a JSON object; fix or delete the file")
    out: dict[str, float | int] = {}
    for key, kind in _SAMPLING_KEYS.items():
        v = gen.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise MlxLoraError(
                f"{GENERATION_CONFIG} has {key}={v!r}, not a finite non-negative number; fix the "
                "value or delete the key"
            )
        if kind is int and v != int(v):
            raise MlxLoraError(f"{GENERATION_CONFIG} has {key}={v!r}, not a whole number")
        out[key] = kind(v)
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def sampling_generation_config(sampling: dict[str, float | int]) -> dict:
    """The inverse of :func:`sampling_defaults`: settings by their Hugging Face names as
    ``generation_config.json`` keys, temperature 0 as ``do_sample: false``."""
    out: dict[str, Any] = {
        k: _SAMPLING_KEYS[k](v) for k, v in sampling.items() if k in _SAMPLING_KEYS
    }
    temp = out.pop("temperature", None)
    if temp is not None:
        out["do_sample"] = temp > 0
        if temp > 0:
            out["temperature"] = temp
    return out


def eos_ids(gen: dict) -> list[int]:
    """``eos_token_id`` of a generation config (a number or a list) as a list."""
    eos = gen.get("eos_token_id")
    items = eos if isinstance(eos, list) else [eos]
    return [i for i in items if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def end_token_ids(tokenizer: Any, gen: dict) -> list[int]:
    """Every id generation must stop on: the tokenizer's eos, each eos id of the generation config,
    the token the chat template closes an assistant turn with, and ChatML's end tokens."""

    tok = hf_tokenizer(tokenizer)
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    ids += eos_ids(gen)
    names = list(CHATML_END_TOKENS)
    if has_chat_template(tok):
        try:
            names.insert(0, end_of_turn(tok))
        except MlxLoraError:
            pass  # a template that never closes a turn: eos is all there is
    specials = {str(t) for t in getattr(tok, "all_special_tokens", [])}
    specials |= {str(t) for t in tok.get_added_vocab()}
    for name in names:
        if name in specials:
            ids.append(int(tok.convert_tokens_to_ids(name)))
    return list(dict.fromkeys(ids))


def end_tokens(tokenizer: Any, gen: dict) -> list[str]:
    """:func:`end_token_ids` as token texts (what a Modelfile's ``PARAMETER stop`` lists)."""

    tok = hf_tokenizer(tokenizer)
    texts = [tok.convert_ids_to_tokens(i) for i in end_token_ids(tok, gen) if i < len(tok)]
    return list(dict.fromkeys(t for t in texts if t))


def training_system_prompt(model_dir: Path | None, adapter: Any = None) -> str | None:
    """The system prompt the model was trained with: the adapter's record, else what ``fuse``
    wrote into the fused folder. ``adapter`` is a :class:`mlx_lora.model.lora.Adapter` or None."""
    if adapter is not None and adapter.extra.get("system_prompt"):
        return adapter.extra["system_prompt"]
    if model_dir is None:
        return None
    return read_json(Path(model_dir) / FUSED_INFO).get("system_prompt") or None
