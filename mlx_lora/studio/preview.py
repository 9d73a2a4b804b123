"""The Train tab's data preview: the first records exactly as training encodes them.

The text comes from :func:`mlx_lora.data.dataset.encode_record` (the function ``load_dataset``
calls), so the highlighted spans are the tokens the loss is computed on, not a re-rendering that
could disagree with training.

Whatever the file holds, a preview stays small: a file over ``FULL_READ`` bytes is read only up to
``PREFIX_BYTES`` (its complete records there), at most ``TRIED`` records are looked at, and each is
cut to ``RECORD_CHARS`` characters of text (``RECORD_ITEMS`` items per list) before it is
tokenized; the answer says so (``partial``, ``clipped``, ``note``). Training reads everything:
the first ``max_seq_length`` tokens that the preview shows come long before any of these cuts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.units import human_bytes
from mlx_lora.data.dataset import (
    FORMATS,
    detect_format,
    encode_record,
    end_of_turn_for,
    read_records,
)
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.prompt import hf_tokenizer, load_hf_tokenizer

FULL_READ = 64 * 2**20  # files up to this size are read whole (every record counted)
PREFIX_BYTES = 8 * 2**20  # of a larger file, only this much
TRIED = 100  # records looked at for the first usable ones
RECORD_CHARS = 200_000  # text kept of one record (each string keeps at least MIN_PIECE)
MIN_PIECE = 256
RECORD_ITEMS = 64  # items kept of each list (turns of a conversation)


@dataclass
class Sample:
    """The records a preview looks at; ``partial`` when the file was read only in part."""

    records: list[Any]
    partial: bool = False
    size: int = 0


def sample_records(path: Path) -> Sample:
    """All records of a file up to ``FULL_READ`` bytes; of a larger one, the complete records in
    its first ``PREFIX_BYTES`` (a studio must not hold a multi-GB dataset to show three records)."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size <= FULL_READ:
        return Sample(read_records(path), False, size)  # bad JSON: file:line:col in one line
    with path.open("rb") as f:
        head = f.read(PREFIX_BYTES)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the prefix
            raise MlxLoraError(
                f"{path}: not UTF-8 (byte {e.start}); save the file as UTF-8"
            ) from None
        text = head[: e.start].decode("utf-8-sig")
    records = _complete_records(text)
    if not records:
        raise MlxLoraError(
            f"{path}: no complete record in its first {human_bytes(PREFIX_BYTES)} (the file is "
            f"{human_bytes(size)}; the preview reads only that much of a file over "
            f"{human_bytes(FULL_READ)})"
        )
    return Sample(records, True, size)


def _complete_records(text: str) -> list[Any]:
    """The records that end inside ``text``, the start of a .json array or a .jsonl file."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    body = text.lstrip()
    if body.startswith("["):
        i = 1
        while len(out) < TRIED:
            while i < len(body) and body[i] in " \t\r\n,":
                i += 1
            try:
                record, i = decoder.raw_decode(body, i)
            except (ValueError, RecursionError):  # cut off by the prefix (or broken: training says)
                break
            out.append(record)
        return out
    for line in text.split("\n")[:-1]:  # the last line may be cut off
        if line.strip():
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):
                break
        if len(out) >= TRIED:
            break
    return out


def clip_record(record: Any, budget: int = RECORD_CHARS) -> tuple[Any, bool]:
    """``record`` with its text cut to about ``budget`` characters in all and its lists to
    ``RECORD_ITEMS`` items; True when something was cut."""
    left = budget
    cut = False

    def walk(value: Any) -> Any:
        nonlocal left, cut
        if isinstance(value, str):
            keep = max(left, MIN_PIECE)
            if len(value) > keep:
                value, cut = value[:keep], True
            left = max(left - len(value), 0)
            return value
        if isinstance(value, list):
            if len(value) > RECORD_ITEMS:
                value, cut = value[:RECORD_ITEMS], True
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    try:
        return walk(record), cut
    except RecursionError:
        raise MlxLoraError("a record is nested too deeply; records are flat objects") from None


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
        raise MlxLoraError(f"unknown format {fmt[:40]!r}; choose one of {', '.join(FORMATS)}")
    sample = sample_records(data)
    records = sample.records
    if not records:
        raise MlxLoraError(f"{data}: the dataset is empty; add records")
    fmt = detect_format(records, data) if fmt == "auto" else fmt
    tokenizer = load_tokenizer(model)
    eot = end_of_turn_for(fmt, tokenizer)
    system_prompt, clipped_prompt = clip_record(system_prompt)
    shown: list[dict] = []
    skipped: list[int] = []
    for n, rec in enumerate(records[:TRIED], 1):
        if len(shown) >= count:
            break
        rec, clipped = clip_record(rec)
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
                "truncated": len(enc.ids) > max_seq_length or clipped or clipped_prompt,
                "clipped": clipped or clipped_prompt,
                "segments": segments(tokenizer, ids, mask),
            }
        )
    return {
        "format": fmt,
        "records": len(records),
        "partial": sample.partial,
        "examples": shown,
        "skipped": skipped,
        "note": _note(sample, shown),
    }


def _note(sample: Sample, shown: list[dict]) -> str | None:
    """What the preview left out, in one line (None: nothing)."""
    parts = []
    if sample.partial:
        parts.append(
            f"the file is {human_bytes(sample.size)}: only its first "
            f"{human_bytes(PREFIX_BYTES)} were read ({len(sample.records)} records)"
        )
    if any(ex["clipped"] for ex in shown):
        parts.append(f"records over {RECORD_CHARS:,} characters were cut before tokenizing")
    return "; ".join(parts) or None
