"""The Train tab's data preview: the first records exactly as training encodes them.

The text comes from :func:`mlx_lora.data.dataset.encode_record` (the function ``load_dataset``
calls), so
the highlighted spans are the tokens the loss is computed on, not a re-rendering that could
disagree with training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import (
    FORMATS,
    detect_format,
    encode_record,
    end_of_turn_for,
    read_records,
)
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.prompt import hf_tokenizer, load_hf_tokenizer


def load_tokenizer(model: str, source: str = "auto") -> Any:
    """The tokenizer of ``model`` (loaded once: :func:`mlx_lora.model.prompt.load_hf_tokenizer`
    caches it); no weights are loaded."""

    return load_hf_tokenizer(Path(resolve_model(model, source)).resolve())


def segments(tokenizer: Any, ids: list[int], mask: list[bool]) -> list[dict]:
    """Runs of trained / untrained tokens as text (special tokens kept visible)."""

    tok = hf_tokenizer(tokenizer)
    out: list[dict] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i], skip_special_tokens=False)
            out.append({"text": text, "trained": bool(mask[start]), "tokens": i - start})
            start = i
    return out


def preview(
    model: str,
    data: Path,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    max_seq_length: int = 2048,
    count: int = 3,
) -> dict:
    """Format, record count and the first ``count`` usable records as highlighted segments."""

    if fmt not in FORMATS:
        raise MlxLoraError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = read_records(data)  # bad JSON: file:line:col in one line
    if not records:
        raise MlxLoraError(f"{data}: the dataset is empty; add records")
    fmt = detect_format(records, data) if fmt == "auto" else fmt
    tokenizer = load_tokenizer(model)
    eot = end_of_turn_for(fmt, tokenizer)
    shown: list[dict] = []
    skipped: list[int] = []
    for n, rec in enumerate(records, 1):
        if len(shown) >= count:
            break
        enc = encode_record(rec, fmt, tokenizer, system_prompt=system_prompt, eot=eot)
        if enc is None:
            skipped.append(n)
            continue
        ids, mask = enc.ids[:max_seq_length], enc.mask[:max_seq_length]
        shown.append(
            {
                "record": n,
                "tokens": len(ids),
                "trained_tokens": sum(mask),
                "truncated": len(enc.ids) > max_seq_length,
                "segments": segments(tokenizer, ids, mask),
            }
        )
    return {"format": fmt, "records": len(records), "examples": shown, "skipped": skipped}
