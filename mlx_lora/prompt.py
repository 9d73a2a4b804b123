"""One way to turn messages into text and token ids, for training, chat, serve, export, verify.

Garbled answers in the seed came from prompts built by hand or with another model's template.
Here every caller goes through :func:`render_template` (transformers' own Jinja environment, so
``raise_exception``, ``strftime_now`` and ``tojson`` behave exactly as in ``apply_chat_template``)
and :func:`encode_text` (one tokenization of the whole rendered text), so the prompt a user chats
with is token for token the prefix the model was trained on, and the Ollama TEMPLATE is derived
from the same rendering. :func:`probe` renders marker conversations to learn how a template is
built (what ends an assistant turn, what separates turns); the Modelfile writer and the loss mask
both read templates through it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.errors import MlxLoraError

Message = dict[str, str]


def hf_tokenizer(tokenizer: Any) -> Any:
    """mlx-lm wraps the Hugging Face tokenizer; the template and offsets live on the inner one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def load_hf_tokenizer(folder: Path) -> Any:
    """The Hugging Face tokenizer of a model folder, without loading any weights."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        raise MlxLoraError(
            f"{folder}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:200]}); the "
            "folder needs its tokenizer files (tokenizer.json or vocab.json + merges.txt)"
        ) from None


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template; of several named ones, the default (what Ollama uses)."""
    template = getattr(hf_tokenizer(tokenizer), "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def has_chat_template(tokenizer: Any) -> bool:
    return chat_template_of(tokenizer) is not None


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """What ``apply_chat_template`` passes a template besides the messages (bos_token, ...)."""
    return dict(hf_tokenizer(tokenizer).special_tokens_map)


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Put ``system_prompt`` first unless the conversation brings its own system turn."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def render_template(
    chat_template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    **special: Any,
) -> str:
    """The text of ``chat_template`` for ``messages``, as ``apply_chat_template(tokenize=False)``
    renders it; template errors (``raise_exception``) become one-line user errors."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {k: v for k, v in special.items() if v is not None}
    try:
        rendered, _ = render_jinja_template(
            conversations=[[dict(m) for m in messages]],
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - jinja raise_exception(), e.g. "system role not supported"
        raise MlxLoraError(f"the model's chat template rejected the conversation: {e}") from None
    return rendered[0]


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` with the tokenizer's own special tokens."""
    template = chat_template_of(tokenizer)
    if template is None:
        raise MlxLoraError(
            "the tokenizer has no chat template, so conversations cannot be rendered; "
            "use --format text or completions, or a chat model"
        )
    return render_template(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        **special_tokens(tokenizer),
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-rendered text (the template supplies any BOS itself)."""
    return list(hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


def build_prompt(
    tokenizer: Any, messages: list[Message], system_prompt: str | None = None
) -> list[int]:
    """Prompt ids for the next assistant answer: what chat, serve and verify feed the model."""
    text = render(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True)
    return encode_text(tokenizer, text)


# ---------------------------------------------------------------------------------------------
# Probing a template with marker conversations


class UnrecognisedTemplate(MlxLoraError):
    """The template does not render the probe conversations in a way that can be taken apart."""


# Markers: plain ASCII words that no template contains and no template would trim or escape.
MARKERS = {
    "system": "Zq8sysAlpha",
    "user": "Zq8usrBravo",
    "assistant": "Zq8astCharlie",
    "user2": "Zq8usrDelta",
}


# What strftime_now(fmt) renders while probing: a marker naming the format, so the pieces show where
# a template puts today's date (Llama 3.2 does) instead of freezing today's value into them.
DATE_MARKER = re.compile(r"Zq8date\[([^\]]*)\]Zq8end")


class _MarkedTime:
    def strftime(self, fmt: str) -> str:
        return f"Zq8date[{fmt}]Zq8end"


class _MarkedClock:
    @staticmethod
    def now(*_: Any, **__: Any) -> _MarkedTime:
        return _MarkedTime()


@contextmanager
def _marked_clock() -> Iterator[None]:
    """transformers' ``strftime_now`` reads its module's ``datetime``; point it at the marker clock
    for the duration of one probe, and refuse if that no longer works (the pieces would otherwise
    hold today's date as if it were constant)."""
    import transformers.utils.chat_template_utils as ctu

    with _CLOCK_LOCK:
        real = getattr(ctu, "datetime", None)
        ctu.datetime = _MarkedClock
        try:
            check = render_template("{{ strftime_now('%Y') }}", [])
            if not DATE_MARKER.fullmatch(check):
                raise UnrecognisedTemplate("this transformers version hides the template's clock")
            yield
        finally:
            ctu.datetime = real


_CLOCK_LOCK = threading.Lock()


def probe(
    chat_template: str,
    roles: Sequence[str],
    special: Mapping[str, Any],
    *,
    add_generation_prompt: bool = True,
    text_order: Sequence[str] | None = None,
) -> list[str]:
    """Render a conversation of markers (``roles`` name :data:`MARKERS` keys) and return the text
    around them: ``len(roles) + 1`` pieces. The markers must appear exactly once each, in the order
    of ``roles`` or of ``text_order`` (a template may move a message, e.g. Mistral puts the system
    text into the last user turn), else :class:`UnrecognisedTemplate`; so does a template that
    fails on the conversation. A date the template formats shows as :data:`DATE_MARKER`."""
    messages = [{"role": r.rstrip("2"), "content": MARKERS[r]} for r in roles]
    uses_clock = "strftime_now" in chat_template
    try:
        with _marked_clock() if uses_clock else nullcontext():
            text = render_template(
                chat_template, messages, add_generation_prompt=add_generation_prompt, **special
            )
    except MlxLoraError as e:
        raise UnrecognisedTemplate(str(e)) from None
    pieces, rest = [], text
    for r in text_order or roles:
        mark = MARKERS[r]
        if text.count(mark) != 1 or mark not in rest:
            raise UnrecognisedTemplate(
                f"the probe text {mark!r} does not appear exactly once in {text!r}"
            )
        before, rest = rest.split(mark, 1)
        pieces.append(before)
    pieces.append(rest)
    return pieces


def _special_strings(tok: Any) -> list[str]:
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content if hasattr(added, "content") else added))
    return sorted((s for s in specials if s), key=len, reverse=True)


def end_of_turn(tokenizer: Any) -> str:
    """The token the template closes an assistant turn with (``<|im_end|>`` for ChatML).

    The first special token between an assistant's text and the next user's, so it follows the
    template rather than the model's name; the eos token when the template puts none there.
    """
    tok = hf_tokenizer(tokenizer)
    template = chat_template_of(tok)
    if template is None:
        raise MlxLoraError("the tokenizer has no chat template, so it has no end-of-turn token")
    try:
        gap = probe(template, ["user", "assistant", "user2"], special_tokens(tok))[2]
    except UnrecognisedTemplate as e:
        raise MlxLoraError(
            f"cannot tell how the chat template ends an assistant turn: {e}"
        ) from None
    found = [(gap.find(s), s) for s in _special_strings(tok) if s in gap]
    if found:
        return min(found)[1]
    eos = getattr(tok, "eos_token", None)
    if not eos:
        raise MlxLoraError(
            "cannot tell how the chat template ends an assistant turn and the tokenizer has no "
            "eos token"
        )
    return eos


# ---------------------------------------------------------------------------------------------
# Training examples


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and, per token, whether the loss is computed on it."""

    ids: list[int]
    mask: list[bool]


def _assistant_span(text: str, content: str, cursor: int, eot: str) -> tuple[int, int, str]:
    """Where the assistant's ``content`` and its end-of-turn token lie in ``text`` (at or after
    ``cursor``); returns (start, end, text) — text gains ``eot`` when the template leaves the last
    turn open."""
    start = text.find(content, cursor)
    if start < 0:  # templates that trim the content (Llama-3 does)
        content = content.strip()
        start = text.find(content, cursor)
    if start < 0:
        raise MlxLoraError(
            "the chat template does not reproduce an assistant turn verbatim; use --format text"
        )
    end = start + len(content)
    gap = text[end:]
    eot_at = gap.find(eot)
    if eot_at >= 0 and not gap[:eot_at].strip():
        return start, end + eot_at + len(eot), text
    if not gap.strip():
        return start, len(text) + len(eot), text + eot
    raise MlxLoraError(
        f"the chat template does not close assistant turns with {eot!r}; use --format text"
    )


def encode_conversation(
    tokenizer: Any,
    messages: list[Message],
    system_prompt: str | None = None,
    eot: str | None = None,
) -> Encoded:
    """Ids of a whole conversation and a mask over every assistant turn plus its end-of-turn token.

    The text is the template's rendering of the whole conversation, tokenized once (exactly what
    :func:`build_prompt` produces for each prefix). A template that leaves the last assistant turn
    open (Qwen1.5 does, for prefill) gets the end-of-turn token appended: a model that never sees
    it never learns to stop.
    """
    tok = hf_tokenizer(tokenizer)
    eot = eot or end_of_turn(tok)
    msgs = with_system(messages, system_prompt)
    text = render(tok, msgs, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, msgs[:i], add_generation_prompt=True)
        if text.startswith(prefix):
            cursor = max(cursor, len(prefix))
        start, end, text = _assistant_span(text, m["content"], cursor, eot)
        spans.append((start, end))
        cursor = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    return Encoded(ids, mask)
