"""Preference and prompt records → encoded pairs, unpaired completions and prompts.

The forms (auto-detected from the keys of the records, like the SFT formats):

- ``preference`` (TRL): ``prompt`` plus ``chosen``/``rejected``, each a string or a message list
  (multi-turn prompts allowed); without ``prompt`` the shared leading messages of ``chosen`` and
  ``rejected`` are the prompt (TRL's implicit prompt).
- ``ranking`` (LLaMA-Factory): alpaca keys (``instruction``, ``input``, ``system``, ``history``) or
  ``conversations``, with ``chosen``/``rejected`` strings (alpaca) or ``{from, value}`` turns.
- ``kto`` (TRL's unpaired form): ``prompt``, ``completion`` and a boolean ``label``.
- ``prompts`` (GRPO): ``prompt`` (string or messages) plus any extra columns, handed to the
  reward functions.

Every answer is rendered with the model's chat template after its prompt, through the one encoder
(:func:`mlx_lora.model.prompt.encode_conversation`); the loss mask keeps only the answer's tokens
(and its end of turn), never an assistant turn of the prompt. Unlike SFT data, a bad record is an
error naming its record number, not a skipped row: a silently dropped pair changes the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import (
    MAX_CHARS_PER_TOKEN,
    SHAREGPT_ROLES,
    Dataset,
    clip_contents,
    read_records,
)
from mlx_lora.model.prompt import (
    Encoded,
    Message,
    build_prompt,
    encode_conversation,
    end_of_turn,
    special_text,
)

PAIRED_FORMATS = ("preference", "ranking")
METHOD_FORMATS = {
    "dpo": PAIRED_FORMATS,
    "orpo": PAIRED_FORMATS,
    "simpo": PAIRED_FORMATS,
    "kto": ("kto", *PAIRED_FORMATS),  # pairs become one desirable and one undesirable row (TRL)
    "grpo": ("prompts", *PAIRED_FORMATS, "kto"),  # only the prompt (and extra columns) is used
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Sequence:
    """One prompt + answer: ids, the answer-only loss mask, and where the answer starts."""

    ids: list[int]
    mask: list[bool]
    prompt_len: int


@dataclass(frozen=True)
class Pair:
    """A chosen and a rejected answer to the same prompt (DPO, IPO, ORPO, SimPO)."""

    chosen: Sequence
    rejected: Sequence

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return (self.chosen, self.rejected)

    @property
    def ids(self) -> list[int]:  # the start-up counts and the plan see both sequences
        return self.chosen.ids + self.rejected.ids

    @property
    def mask(self) -> list[bool]:
        return self.chosen.mask + self.rejected.mask


@dataclass(frozen=True)
class Unpaired:
    """A completion labelled desirable or not (KTO)."""

    seq: Sequence
    label: bool

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return (self.seq,)

    @property
    def ids(self) -> list[int]:
        return self.seq.ids

    @property
    def mask(self) -> list[bool]:
        return self.seq.mask


@dataclass(frozen=True)
class PromptRow:
    """A GRPO prompt: its messages, prompt ids, and the record's other columns."""

    messages: list[Message]
    ids: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    record: int = 0

    @property
    def mask(self) -> list[bool]:
        return [False] * len(self.ids)

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        return (Sequence(self.ids, self.mask, len(self.ids)),)


# ---------------------------------------------------------------- reading the forms


def detect_preference_format(records: list[Any], method: str, path: Path | str) -> str:
    """The form of the records (the first object that identifies one), checked against
    ``method``."""
    for r in records[:200]:
        if not isinstance(r, dict):
            continue
        keys = set(r)
        if {"chosen", "rejected"} <= keys:
            fmt = "ranking" if keys & {"instruction", "conversations"} else "preference"
        elif {"completion", "label"} <= keys:
            fmt = "kto"
        elif "prompt" in keys:
            fmt = "prompts"
        else:
            continue
        if fmt not in METHOD_FORMATS[method]:
            want = " or ".join(METHOD_FORMATS[method])
            raise MlxLoraError(
                f"{path}: the records are in the {fmt} form, --method {method} needs {want} "
                "records (see README: preference training)"
            )
        return fmt
    raise MlxLoraError(
        f"{path}: no preference records found; --method {method} needs "
        f"{' or '.join(METHOD_FORMATS[method])} records (prompt + chosen/rejected, "
        "prompt + completion + label, or prompt)"
    )


def _bad(n: int, what: str) -> MlxLoraError:
    return MlxLoraError(f"record {n}: {what}")


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _turns(v: Any, n: int, key: str, default_role: str) -> list[Message]:
    """A string (one ``default_role`` turn) or a message list (``role``/``content`` or ShareGPT's
    ``from``/``value``) as messages."""
    if _text(v):
        return [{"role": default_role, "content": v}]
    items = [v] if isinstance(v, dict) else v
    if not isinstance(items, list) or not items:
        raise _bad(n, f"{key} must be a non-empty string or message list")
    out: list[Message] = []
    for t in items:
        if not isinstance(t, dict):
            raise _bad(n, f"{key} holds a {type(t).__name__}, expected messages")
        role = t.get("role", SHAREGPT_ROLES.get(str(t.get("from", "")).lower()))
        content = t.get("content", t.get("value"))
        if role not in ROLES or not _text(content):
            raise _bad(n, f"{key} has a message without a known role and text content")
        out.append({"role": role, "content": content})
    return out


def _answer(v: Any, n: int, key: str) -> list[Message]:
    msgs = _turns(v, n, key, "assistant")
    if msgs[-1]["role"] != "assistant":
        raise _bad(n, f"{key} must end with an assistant message")
    return msgs


def _alpaca_prompt(r: dict, n: int) -> list[Message]:
    if not _text(r.get("instruction")):
        raise _bad(n, "instruction is missing or empty")
    msgs: list[Message] = []
    if _text(r.get("system")):
        msgs.append({"role": "system", "content": r["system"]})
    for pair in r.get("history") or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(map(_text, pair))):
            raise _bad(n, "history must be a list of [question, answer] string pairs")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    extra = r.get("input")
    user = f"{r['instruction']}\n{extra}" if _text(extra) else r["instruction"]
    return [*msgs, {"role": "user", "content": user}]


def _prompt(r: dict, n: int, fmt: str) -> list[Message]:
    """The prompt messages of a record in any form."""
    if fmt == "ranking":
        if "conversations" in r:
            return _turns(r["conversations"], n, "conversations", "user")
        return _alpaca_prompt(r, n)
    if "prompt" not in r:
        raise _bad(n, "prompt is missing")
    msgs = _turns(r["prompt"], n, "prompt", "user")
    if _text(r.get("system")) and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": r["system"]})
    return msgs


def _implicit(r: dict, n: int) -> tuple[list[Message], list[Message], list[Message]]:
    """TRL's implicit prompt: the shared leading messages of two whole conversations."""
    c = _answer(r.get("chosen"), n, "chosen")
    j = _answer(r.get("rejected"), n, "rejected")
    k = 0
    while k < min(len(c), len(j)) - 1 and c[k] == j[k]:
        k += 1
    if k == 0:
        raise _bad(n, "no prompt: give prompt, or chosen/rejected conversations sharing a prefix")
    return c[:k], c[k:], j[k:]


def pair_messages(r: Any, n: int, fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) messages of a paired record."""
    if not isinstance(r, dict):
        raise _bad(n, f"expected an object, got {type(r).__name__}")
    if fmt == "preference" and "prompt" not in r:
        return _implicit(r, n)
    for key in ("chosen", "rejected"):
        if key not in r:
            raise _bad(n, f"{key} is missing")
    return (
        _prompt(r, n, fmt),
        _answer(r["chosen"], n, "chosen"),
        _answer(r["rejected"], n, "rejected"),
    )


def kto_messages(r: Any, n: int) -> tuple[list[Message], list[Message], bool]:
    if not isinstance(r, dict):
        raise _bad(n, f"expected an object, got {type(r).__name__}")
    label = r.get("label")
    if not isinstance(label, bool):
        raise _bad(n, f"label must be true or false, got {label!r}")
    return _prompt(r, n, "kto"), _answer(r.get("completion"), n, "completion"), label


# ---------------------------------------------------------------- encoding


@dataclass
class Encoder:
    """Renders prompts and answers with one tokenizer and one system prompt."""

    tokenizer: Any
    system_prompt: str | None
    max_seq_length: int
    allow_special: bool = False
    truncated: int = 0
    special: int = 0

    def prompt_ids(self, prompt: list[Message]) -> list[int]:
        return build_prompt(
            self.tokenizer, prompt, self.system_prompt, allow_special=self.allow_special
        )

    def sequence(self, prompt: list[Message], answer: list[Message], n: int) -> Sequence:
        """Prompt + answer ids; the mask covers the answer's assistant turns only."""
        limit = self.max_seq_length * MAX_CHARS_PER_TOKEN
        msgs = clip_contents([*prompt, *answer], limit)
        self.special += bool(special_text(self.tokenizer, msgs))
        head = self.prompt_ids(msgs[: len(prompt)])
        enc: Encoded = encode_conversation(
            self.tokenizer,
            msgs,
            self.system_prompt,
            end_of_turn(self.tokenizer),
            allow_special=self.allow_special,
        )
        p = len(head)
        if enc.ids[:p] != head:
            raise _bad(n, "the chat template renders the prompt differently before an answer")
        mask = [False] * p + list(enc.mask[p:])
        ids = enc.ids
        if len(ids) > self.max_seq_length:
            self.truncated += 1
            ids, mask = ids[: self.max_seq_length], mask[: self.max_seq_length]
        if not any(mask[1:]):
            raise _bad(
                n,
                f"no answer token left within --max-seq-length {self.max_seq_length}; raise it "
                "or shorten the prompt",
            )
        return Sequence(ids, mask, p)


def _encode(r: Any, n: int, fmt: str, method: str, enc: Encoder) -> list[tuple[Any, list]]:
    """The training items of one record for ``method``, each with the messages it renders (the
    prompt and its chosen / desirable answer: what ``--eval-at-end`` scores)."""
    if method == "grpo":
        if not isinstance(r, dict):
            raise _bad(n, f"expected an object, got {type(r).__name__}")
        prompt = pair_messages(r, n, fmt)[0] if fmt in PAIRED_FORMATS else _prompt(r, n, fmt)
        extras = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
        return [(PromptRow(prompt, enc.prompt_ids(prompt), extras, n), prompt)]
    if fmt == "kto":
        prompt, answer, label = kto_messages(r, n)
        return [(Unpaired(enc.sequence(prompt, answer, n), label), [*prompt, *answer])]
    prompt, chosen, rejected = pair_messages(r, n, fmt)
    c, j = enc.sequence(prompt, chosen, n), enc.sequence(prompt, rejected, n)
    if method == "kto":
        return [(Unpaired(c, True), [*prompt, *chosen]), (Unpaired(j, False), [*prompt, *rejected])]
    return [(Pair(c, j), [*prompt, *chosen])]


def preferred_answers(items: list, sources: list) -> tuple[list[Sequence], list]:
    """The answers preference training pushes up, as SFT-like examples (ids + answer mask) with
    their conversations: each pair's chosen answer, KTO's desirable completions. GRPO prompts
    have none."""
    out, convs = [], []
    for item, src in zip(items, sources, strict=True):
        if isinstance(item, Pair):
            out.append(item.chosen)
        elif isinstance(item, Unpaired) and item.label:
            out.append(item.seq)
        else:
            continue
        convs.append(src)
    return out, convs


def load_preference(
    path: Path,
    tokenizer: Any,
    method: str,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    max_seq_length: int = 2048,
    allow_special: bool = False,
) -> Dataset:
    """The items of ``method`` (pairs, unpaired completions or prompts) as a :class:`Dataset`."""
    records = read_records(path)
    if not records:
        raise MlxLoraError(f"{path}: the dataset is empty; add records")
    if fmt == "auto":
        fmt = detect_preference_format(records, method, path)
    elif fmt not in METHOD_FORMATS[method]:
        raise MlxLoraError(
            f"--format {fmt} does not fit --method {method}; use "
            f"{' or '.join(METHOD_FORMATS[method])} (or auto)"
        )
    enc = Encoder(tokenizer, system_prompt, max_seq_length, allow_special)
    ds = Dataset([], fmt, len(records), allow_special=allow_special)
    for n, r in enumerate(records, 1):
        try:
            for item, src in _encode(r, n, fmt, method, enc):
                ds.examples.append(item)
                ds.sources.append(src)
        except MlxLoraError as e:
            raise MlxLoraError(f"{path}: {e}") from None
    if method == "kto" and len({e.label for e in ds.examples}) < 2:
        raise MlxLoraError(
            f"{path}: KTO needs both desirable (true) and undesirable (false) labels"
        )
    ds.truncated, ds.special_text = enc.truncated, enc.special
    return ds
