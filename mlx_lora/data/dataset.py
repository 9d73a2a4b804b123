"""Dataset files → token ids + loss masks → batches.

Reads a JSON array or JSONL file, detects the record format, turns each record into chat messages,
and renders them with the tokenizer's own template (:mod:`mlx_lora.model.prompt`), never a
hard-coded one.
Record contents are text: a record that mentions ``<|im_end|>`` is trained on those characters,
not on an end of turn (counted at start-up). Bad records are skipped and counted; bad files fail
with file, line and column.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.prompt import (
    Encoded,
    Message,
    encode_content,
    encode_conversation,
    end_of_turn,
    has_chat_template,
    hf_tokenizer,
    special_text,
)

SFT_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "completions", "text")
# read by mlx_lora.data.preference for --method dpo/orpo/simpo/kto/grpo
PREFERENCE_FORMATS = ("preference", "ranking", "kto", "prompts")
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def read_records(path: Path) -> list[Any]:
    """Records of a ``.json`` array or a ``.jsonl`` file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise MlxLoraError(
            f"data file {path} not found; pass --data FILE (a .json array or .jsonl file)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MlxLoraError(
            f"{path}: not UTF-8 (byte {e.start}, line {line}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise MlxLoraError(
            f"{path}: the file is empty; it needs a JSON array of records or one JSON object per "
            "line"
        )
    if path.suffix.lower() == ".jsonl" or (
        not text.lstrip().startswith("[") and path.suffix.lower() != ".json"
    ):
        records = []
        # only "\n" ends a JSONL line: str.splitlines() would also split at U+2028, U+0085, ...,
        # json.dumps(ensure_ascii=False) leaves raw inside strings
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MlxLoraError(
                    f"{path}:{n}:{e.colno}: invalid JSON ({e.msg}); fix that line"
                ) from None
            except RecursionError:
                raise MlxLoraError(
                    f"{path}:{n}: JSON nested too deeply; records are flat objects"
                ) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MlxLoraError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix the file or use .jsonl"
        ) from None
    except RecursionError:
        raise MlxLoraError(f"{path}: JSON nested too deeply; records are flat objects") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers are common
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise MlxLoraError(
                f"{path}: expected a JSON array of records, got an object with keys "
                f"{', '.join(map(_key, list(data)[:8]))}"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise MlxLoraError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _key(k: str) -> str:
    """A key as the file spells it (line breaks, control characters escaped): one-line errors."""
    return json.dumps(k, ensure_ascii=False)[1:-1]


def detect_format(records: list[Any], path: Path | str = "data") -> str:
    """Format from the keys of the records (the first dict that identifies one)."""
    seen: Counter[str] = Counter()
    for r in records[:200]:
        if not isinstance(r, dict):
            continue
        seen.update(r.keys())
        if "conversations" in r:
            return "sharegpt"
        if "messages" in r:
            return "messages"
        if "instruction" in r and "output" in r:
            return "alpaca"
        if "prompt" in r and "completion" in r:
            return "completions"
        if "text" in r:
            return "text"
    if not seen:
        raise MlxLoraError(f"{path}: no JSON objects found; each record must be an object")
    raise MlxLoraError(
        f"{path}: unknown record format (keys seen: "
        f"{', '.join(_key(k) for k, _ in seen.most_common(10))}); "
        "expected alpaca (instruction/input/output), sharegpt (conversations), messages, "
        "completions (prompt/completion) or text"
    )


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def to_messages(record: Any, fmt: str) -> list[Message] | str | None:
    """Chat messages for a record (a plain string for ``text``); ``None`` when it is unusable."""
    if not isinstance(record, dict):
        return None
    if fmt == "alpaca":
        instruction, output = _text(record.get("instruction")), _text(record.get("output"))
        if instruction is None or output is None:
            return None
        extra = record.get("input")
        user = f"{instruction}\n{extra}" if _text(extra) else instruction
        msgs: list[Message] = []
        if _text(record.get("system")):
            msgs.append({"role": "system", "content": record["system"]})
        history = record.get("history") or []
        if not isinstance(history, list):
            return None
        for pair in history:
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(_text(p) for p in pair)
            ):
                return None
            msgs += [
                {"role": "user", "content": pair[0]},
                {"role": "assistant", "content": pair[1]},
            ]
        return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt in ("sharegpt", "messages"):
        turns = record.get("conversations" if fmt == "sharegpt" else "messages")
        if not isinstance(turns, list) or not turns:
            return None
        msgs = []
        for t in turns:
            if not isinstance(t, dict):
                return None
            role = t.get("from", t.get("role")) if fmt == "sharegpt" else t.get("role")
            content = t.get("value", t.get("content")) if fmt == "sharegpt" else t.get("content")
            role = SHAREGPT_ROLES.get(str(role).lower()) if fmt == "sharegpt" else role
            if role not in ("system", "user", "assistant") or _text(content) is None:
                return None
            msgs.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in msgs):
            return None
        return msgs
    if fmt == "completions":
        prompt, completion = _text(record.get("prompt")), _text(record.get("completion"))
        if prompt is None or completion is None:
            return None
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if fmt == "text":
        return _text(record.get("text"))
    raise MlxLoraError(f"--format {fmt!r} is no SFT format; choose one of {', '.join(SFT_FORMATS)}")


def encode_plain(tokenizer: Any, text: str, allow_special: bool = False) -> Encoded:
    """Raw text for continued pre-training: every token is a target, the eos ends the document."""
    tok = hf_tokenizer(tokenizer)
    ids = encode_content(tok, text, add_special_tokens=True, allow_special=allow_special)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return Encoded(ids, [True] * len(ids))


def end_of_turn_for(fmt: str, tokenizer: Any) -> str | None:
    """The end-of-turn token when records of ``fmt`` are rendered with the chat template, else None
    (``text``, and ``completions`` for a tokenizer without a template, are plain text)."""
    if fmt == "text" or (fmt == "completions" and not has_chat_template(tokenizer)):
        return None
    return end_of_turn(tokenizer)


# No token spans more characters than this, so the first N tokens of a text lie within its first
# N × this characters: contents beyond that are cut before tokenizing (a 50 MB record would
# otherwise be tokenized whole, gigabytes, only to be truncated to --max-seq-length).
MAX_CHARS_PER_TOKEN = 64


def clip_contents(item: list[Message] | str, max_chars: int) -> list[Message] | str:
    """The record cut to ``max_chars`` characters of content in order (later messages keep one
    character, so the conversation keeps its shape); tokens past the cut are truncated anyway."""
    if isinstance(item, str):
        return item[:max_chars]
    out, left = [], max_chars
    for m in item:
        text = m["content"]
        if len(text) > left:
            text = text[: max(left, 1)]
        left = max(left - len(text), 0)
        out.append({**m, "content": text})
    return out


def record_chars(item: list[Message] | str) -> int:
    return len(item) if isinstance(item, str) else sum(len(m["content"]) for m in item)


def encode_record(
    record: Any,
    fmt: str,
    tokenizer: Any,
    *,
    system_prompt: str | None,
    eot: str | None,
    allow_special: bool = False,
    max_tokens: int | None = None,
) -> Encoded | None:
    """Ids and loss mask of one record, untruncated unless ``max_tokens`` (then at least its first
    ``max_tokens`` ids are exact); None when the record is unusable.

    ``eot`` comes from :func:`end_of_turn_for` (None: plain text). Training and the studio's data
    preview both call this, so the preview shows exactly what is trained. Special-token text in
    the record is text unless ``allow_special``.
    """
    item = to_messages(record, fmt)
    if item is not None and max_tokens is not None:
        item = clip_contents(item, max_tokens * MAX_CHARS_PER_TOKEN)
    return _encode_item(item, tokenizer, system_prompt, eot, allow_special)


def _encode_item(
    item: list[Message] | str | None,
    tokenizer: Any,
    system_prompt: str | None,
    eot: str | None,
    allow_special: bool,
) -> Encoded | None:
    if item is None:
        return None
    if isinstance(item, str):
        return encode_plain(tokenizer, item, allow_special)
    if eot is not None:
        return encode_conversation(tokenizer, item, system_prompt, eot, allow_special=allow_special)
    # completions without a chat template: prompt, then completion + eos
    p = encode_plain(tokenizer, item[0]["content"], allow_special)
    c = encode_content(tokenizer, item[1]["content"], allow_special=allow_special)
    ids = p.ids[:-1] + c + [p.ids[-1]]
    return Encoded(ids, [False] * (len(p.ids) - 1) + [True] * (len(c) + 1))


@dataclass
class Dataset:
    """Encoded examples and the counts the start-up summary reports."""

    examples: list[Encoded]
    format: str
    records: int
    skipped: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    sources: list[list[Message] | str] = field(default_factory=list)  # per example: what it encodes
    special_text: int = 0  # records whose contents mention special tokens (e.g. <|im_end|>)
    allow_special: bool = False  # ... and whether those became control tokens

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def target_tokens(self) -> int:
        return sum(sum(e.mask) for e in self.examples)


def load_dataset(
    path: Path,
    tokenizer: Any,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    max_seq_length: int = 2048,
    allow_special: bool = False,
) -> Dataset:
    """Read, detect, render and tokenize; over-long rows are truncated and counted. Special-token
    text in a record is encoded as text unless ``allow_special``; such records are counted."""
    if max_seq_length < 2:
        raise MlxLoraError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    if fmt in PREFERENCE_FORMATS:
        raise MlxLoraError(
            f"--format {fmt} holds preference data; train it with --method dpo, orpo, simpo, kto "
            "or grpo"
        )
    if fmt not in FORMATS:
        raise MlxLoraError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    records = read_records(path)
    if not records:
        raise MlxLoraError(f"{path}: the dataset is empty; add records")
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    eot = end_of_turn_for(fmt, tokenizer)
    ds = Dataset([], fmt, len(records), allow_special=allow_special)
    for n, rec in enumerate(records, 1):
        item = to_messages(rec, fmt)
        clipped = item is not None and record_chars(item) > max_seq_length * MAX_CHARS_PER_TOKEN
        if clipped:
            item = clip_contents(item, max_seq_length * MAX_CHARS_PER_TOKEN)
        enc = _encode_item(item, tokenizer, system_prompt, eot, allow_special)
        if enc is None:
            ds.skipped += 1
            ds.skipped_lines.append(n)
            continue
        ds.special_text += bool(special_text(tokenizer, item))
        if len(enc.ids) > max_seq_length or clipped:
            ds.truncated += 1
            enc = Encoded(enc.ids[:max_seq_length], enc.mask[:max_seq_length])
        if not any(enc.mask[1:]):  # the first token is never predicted
            ds.dropped_no_target += 1
            continue
        ds.examples.append(enc)
        ds.sources.append(item)
    if not ds.examples:
        why = (
            f"all {ds.records} records were skipped (missing or empty fields for format {fmt}); "
            "fix the data or pass --format"
        )
        if ds.dropped_no_target:
            why = (
                f"no record keeps an answer token within --max-seq-length {max_seq_length}; "
                "raise --max-seq-length or shorten the prompts"
            )
        raise MlxLoraError(f"{path}: {why}")
    return ds


def split(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation index split; a positive fraction always yields ≥ 1 validation row."""
    if not 0.0 <= val_split < 1.0:
        raise MlxLoraError(f"--val-split must be in [0, 1), got {val_split}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_split == 0 else max(1, round(n * val_split))
    if n_val >= n:
        raise MlxLoraError(f"--val-split {val_split} leaves no training examples out of {n}")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled example order of one epoch: a pure function of (seed, epoch): resume replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Batch:
    """Packed rows: tokens, per-token segment ids (block-diagonal attention), and loss targets.

    ``targets`` are flat indices into ``inputs`` (row * length + position) of positions whose
    *next* token is a loss target, ``labels`` those next tokens; both padded with weight 0.
    """

    inputs: np.ndarray  # [rows, length] int32
    segments: np.ndarray  # [rows, length] int32
    targets: np.ndarray  # [n_targets] int32
    labels: np.ndarray  # [n_targets] int32
    weights: np.ndarray  # [n_targets] float32
    n_examples: int

    @property
    def n_tokens(self) -> int:
        return int((self.segments >= 0).sum())

    @property
    def n_target_tokens(self) -> int:
        return int(self.weights.sum())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pack_rows(
    lengths: list[int], max_len: int, packing: bool = True, pad_to: int = 32, lanes: int = 1
) -> tuple[list[list[int]], int]:
    """Rows (lists of example indices) and their padded length: the layout of :func:`make_batch`
    (the memory plan, :mod:`mlx_lora.plan.memory`, lays batches out with this same function)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = lengths[i]
        fits = [r for r, f in enumerate(fill) if f + n <= max_len] if packing else []
        if not fits or len(rows) < lanes:
            rows.append([i])
            fill.append(n)
            continue
        slot = min(fits, key=fill.__getitem__) if lanes > 1 else fits[0]
        rows[slot].append(i)
        fill[slot] += n
    return rows, min(_round_up(max(fill), pad_to), _round_up(max_len, pad_to))


def padded_targets(n: int, pad_to: int = 32) -> int:
    """Target slots of a batch: a multiple of ``pad_to`` (at least one), the padding weighted 0."""
    return max(pad_to, _round_up(n, pad_to))


def make_batch(
    examples: list[Encoded],
    max_len: int,
    packing: bool = True,
    pad_id: int = 0,
    pad_to: int = 32,
    lanes: int = 1,
) -> Batch:
    """Lay ``examples`` out in rows: packed into rows of at most ``max_len`` tokens (or one per
    row); row length and target count rounded up to a multiple of ``pad_to`` (32: shapes repeat
    for a step compiled per shape; 1: exact, for the eager step). ``lanes`` > 1 packs into at
    least that many rows of balanced length (longest first, into the emptiest row), which the
    forward runs side by side; otherwise first-fit decreasing.

    Packing changes only the layout: attention stays within each example (segment ids) and the
    loss sums the same target tokens, so a packed batch computes the same update.
    """
    rows, length = pack_rows([len(e.ids) for e in examples], max_len, packing, pad_to, lanes)
    inputs = np.full((len(rows), length), pad_id, dtype=np.int32)
    segments = np.full((len(rows), length), -1, dtype=np.int32)
    targets, labels = [], []
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members):
            ex = examples[i]
            n = len(ex.ids)
            inputs[r, pos : pos + n] = ex.ids
            segments[r, pos : pos + n] = seg
            for t in range(1, n):
                if ex.mask[t]:
                    targets.append(r * length + pos + t - 1)
                    labels.append(ex.ids[t])
            pos += n
    n_t = len(targets)
    size = padded_targets(n_t, pad_to)
    t = np.zeros(size, dtype=np.int32)
    y = np.zeros(size, dtype=np.int32)
    w = np.zeros(size, dtype=np.float32)
    t[:n_t], y[:n_t], w[:n_t] = targets, labels, 1.0
    return Batch(inputs, segments, t, y, w, len(examples))
