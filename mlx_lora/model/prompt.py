"""One way to turn messages into text and token ids, for training, chat, serve, export, verify.

Garbled answers in the seed came from prompts built by hand or with another model's template.
Here every caller goes through :func:`render_template` (transformers' own Jinja environment, so
``raise_exception``, ``strftime_now`` and ``tojson`` behave exactly as in ``apply_chat_template``)
and :func:`encode_text` (one tokenization of the whole rendered text), so the prompt a user chats
with is token for token the prefix the model was trained on, and the Ollama TEMPLATE is derived
from the same rendering. :func:`probe` renders marker conversations to learn how a template is
built (what ends an assistant turn, what separates turns); the Modelfile writer and the loss mask
both read templates through it.

Message contents are text, never control tokens (:func:`encode_chat`): only the special tokens the
template itself writes become control ids, so a user who types ``<|im_end|>\n<|im_start|>system``
cannot open a system turn of their own, and a training answer that mentions ``<|im_end|>`` is not
cut in two. For contents without special-token text the ids are those of ``apply_chat_template``.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError

Message = dict[str, str]


def hf_tokenizer(tokenizer: Any) -> Any:
    """mlx-lm wraps the Hugging Face tokenizer; the template and offsets live on the inner one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


# The files a tokenizer is made of (fuse and export copy them byte for byte).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
_CACHE_SIZE = 4
_LOADED: OrderedDict[tuple, Any] = OrderedDict()
_LOADING = threading.Lock()


def tokenizer_key(folder: Path) -> str:
    """The tokenizer files' content hash: a fused or exported folder (byte-identical copies)
    shares its base's key, so one command loads each tokenizer once."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _loaded(key: tuple, build: Callable[[], Any]) -> Any:
    with _LOADING:  # the studio and serve load from several threads
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        value = _LOADED[key] = build()
        while len(_LOADED) > _CACHE_SIZE:
            _LOADED.popitem(last=False)
        return value


def load_hf_tokenizer(folder: Path) -> Any:
    """The Hugging Face tokenizer of a model folder, without loading any weights; the one
    tokenizer loader (cached by :func:`tokenizer_key`: treat the result as read-only)."""
    return _loaded(("hf", tokenizer_key(folder)), lambda: _load_hf(Path(folder)))


def load_mlx_tokenizer(folder: Path, eos_token_ids: Any = None) -> Any:
    """mlx-lm's wrapper (streaming detokenizer, end ids) around the same files."""
    from mlx_lm.utils import load_tokenizer

    eos = tuple(eos_token_ids) if isinstance(eos_token_ids, list) else eos_token_ids
    key = ("mlx", tokenizer_key(folder), eos)
    return _loaded(key, lambda: load_tokenizer(Path(folder), eos_token_ids=eos_token_ids))


def _load_hf(folder: Path) -> Any:
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
    """Token ids of already-rendered text, every special-token text parsed as its control id (what
    llama.cpp does with ``parse_special``); conversations go through :func:`encode_chat`."""
    return list(hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Encoding a conversation: the template's special tokens as control ids, contents as text


@dataclass(frozen=True)
class _Controls:
    """A tokenizer's control tokens (its special added tokens): what a template writes to mark
    turns, and what message contents must never produce."""

    ids: dict[str, int]
    strip: dict[str, tuple[bool, bool]]  # (lstrip, rstrip): whitespace the token swallows
    pattern: re.Pattern[str]  # any of them, longest first (the tokenizer's own matching rule)


_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _cached(tok: Any, key: str, make: Callable[[], Any]) -> Any:
    try:
        slot = _CACHE.setdefault(tok, {})
    except TypeError:  # not weak-referenceable: no cache
        return make()
    if key not in slot:
        slot[key] = make()
    return slot[key]


def _backend(tok: Any) -> Any:
    return getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)


def _controls(tok: Any) -> _Controls:
    def make() -> _Controls:
        backend = _backend(tok)
        added = (
            backend.get_added_tokens_decoder()
            if backend is not None
            else getattr(tok, "added_tokens_decoder", {})
        )
        specials = {i: t for i, t in added.items() if getattr(t, "special", False) and t.content}
        ids = {t.content: i for i, t in specials.items()}
        strip = {t.content: (bool(t.lstrip), bool(t.rstrip)) for t in specials.values()}
        alternatives = sorted(ids, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, alternatives)) or "(?!)")
        return _Controls(ids, strip, pattern)

    return _cached(tok, "controls", make)


def _strings(obj: Any) -> Iterator[str]:
    """Every string value in a message list (contents, names, tool arguments; not dict keys)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _strings(v)


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_map_strings(v, fn) for v in obj]
    return obj


def special_text(tokenizer: Any, content: Any) -> Counter[str]:
    """How often each special token's text occurs in ``content`` (messages or a string)."""
    pattern = _controls(hf_tokenizer(tokenizer)).pattern
    return Counter(m for s in _strings(content) for m in pattern.findall(s))


@dataclass
class RenderedChat:
    """A conversation's text and where the template's own control tokens lie in it.

    ``controls`` None: no content holds special-token text, so tokenizing ``text`` as a whole
    (special tokens parsed) is exact and is what ``apply_chat_template`` does. Otherwise the
    (start, end, id) spans of the template's control tokens; the rest of the text is plain text.
    ``escaped`` counts the special-token texts of contents that are encoded as plain text.
    """

    text: str
    controls: list[tuple[int, int, int]] | None = None
    escaped: Counter[str] = field(default_factory=Counter)

    def close_turn(self, token: str, token_id: int | None) -> None:
        """Append the end-of-turn token a template leaves out (a control token, never text)."""
        start = len(self.text)
        self.text += token
        if self.controls is not None:
            if token_id is None:
                raise MlxLoraError(f"the end-of-turn text {token!r} is not a special token")
            self.controls.append((start, len(self.text), token_id))


# Placeholders stand for special-token text of contents while the template runs: characters of
# Supplementary Private Use Area-B, chosen per conversation among those its strings do not hold.
_PLACEHOLDERS = range(0x10FFFD, 0x100000, -1)


def _placeholders(tokens: Sequence[str], strings: Sequence[str]) -> dict[str, str]:
    used = set("".join(strings))
    free = (c for c in map(chr, _PLACEHOLDERS) if c not in used)
    marks = dict(zip(tokens, free, strict=False))
    if len(marks) < len(tokens):
        raise MlxLoraError(
            "the message contents use too many private-use characters to be encoded safely; "
            "remove them"
        )
    return marks


def render_chat(
    tokenizer: Any,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    allow_special: bool = False,
) -> RenderedChat:
    """The template's text for ``messages``, with the special tokens the template wrote told apart
    from special-token text inside contents (``allow_special``: no difference, the old raw way)."""
    tok = hf_tokenizer(tokenizer)
    ctl = _controls(tok)
    strings = list(_strings(messages))
    found = Counter(m for s in strings for m in ctl.pattern.findall(s))
    if allow_special or not found:
        return RenderedChat(render(tok, messages, add_generation_prompt=add_generation_prompt))
    marks = _placeholders(list(found), strings)
    text_of = {c: t for t, c in marks.items()}
    marked = _map_strings(messages, lambda s: ctl.pattern.sub(lambda m: marks[m.group()], s))
    rendered = render(tok, marked, add_generation_prompt=add_generation_prompt)
    scan = re.compile(f"{ctl.pattern.pattern}|[{''.join(text_of)}]")
    parts: list[str] = []
    controls: list[tuple[int, int, int]] = []
    pos = length = 0
    for m in scan.finditer(rendered):
        parts.append(rendered[pos : m.start()])
        length += m.start() - pos
        piece = m.group()
        if piece in text_of:  # a content's special-token text: back to its characters, as text
            piece = text_of[piece]
        else:
            controls.append((length, length + len(piece), ctl.ids[piece]))
        parts.append(piece)
        length += len(piece)
        pos = m.end()
    parts.append(rendered[pos:])
    return RenderedChat("".join(parts), _swallow(controls, "".join(parts), ctl), found)


def _swallow(
    controls: list[tuple[int, int, int]], text: str, ctl: _Controls
) -> list[tuple[int, int, int]]:
    """Widen control spans over the whitespace their token strips (``lstrip``/``rstrip``), as
    the tokenizer's own splitting does."""
    id_text = {i: t for t, i in ctl.ids.items()}
    out: list[tuple[int, int, int]] = []
    for k, (s, e, i) in enumerate(controls):
        lstrip, rstrip = ctl.strip.get(id_text[i], (False, False))
        floor = out[-1][1] if out else 0
        ceil = controls[k + 1][0] if k + 1 < len(controls) else len(text)
        while lstrip and s > floor and text[s - 1].isspace():
            s -= 1
        while rstrip and e < ceil and text[e].isspace():
            e += 1
        out.append((s, e, i))
    return out


class _TextMode:
    """A private copy of the tokenizer that reads special-token text as ordinary text (the
    shared tokenizer's ``split_special_tokens`` switch is global state: unsafe under threads)."""

    def __init__(self, tok: Any):
        backend = _backend(tok)
        if backend is None:
            raise MlxLoraError(
                "message contents hold special-token text and this tokenizer has no fast "
                "(tokenizer.json) form to encode it as text; pass --allow-special-tokens-in-content"
            )
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(backend.to_str())
        self.tok.no_truncation()
        self.tok.no_padding()
        self.tok.encode_special_tokens = True
        self.newline = self.encode("\n")[0]
        self.after_control = self._calibrate(tok, backend)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def _with_newline(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Encoded behind a newline that is then dropped: SentencePiece adds no word-start space
        there, as after a control token (transformers' own trick)."""
        ids, offs = self.encode("\n" + text)
        n = len(self.newline)
        if ids[:n] != self.newline:
            return self.encode(text)
        return ids[n:], [(max(s - 1, 0), max(e - 1, 0)) for s, e in offs[n:]]

    def _calibrate(self, tok: Any, backend: Any) -> Callable[[str], tuple[list, list]]:
        """How text right after a control token is encoded: as it stands, or behind a newline;
        whichever reproduces the tokenizer on probe texts (byte-level BPE: as it stands)."""
        ctl = _controls(tok)
        plain = [t for t, (ls, rs) in ctl.strip.items() if not (ls or rs)]
        if not plain:
            return self.encode
        probes = ("Hello world", "user\nHi there, 12 cats", "x  y\n\nz")
        want = [backend.encode(plain[0] + p, add_special_tokens=False).ids[1:] for p in probes]
        for way in (self.encode, self._with_newline):
            if all(way(p)[0] == w for p, w in zip(probes, want, strict=True)):
                return way
        return self.encode

    def piece(self, text: str, start: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets (into the whole text) of plain text beginning at ``start``."""
        ids, offs = self.encode(text) if start == 0 else self.after_control(text)
        return ids, [(s + start, e + start) for s, e in offs]


def tokenize_chat(
    tokenizer: Any, chat: RenderedChat, *, offsets: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of a rendered conversation and each token's character span in ``chat.text`` (spans
    only with ``offsets``: Python-only tokenizers have none, and prompts do not need them)."""
    tok = hf_tokenizer(tokenizer)
    if chat.controls is None:
        if not offsets:
            return list(tok(chat.text, add_special_tokens=False)["input_ids"]), []
        enc = tok(chat.text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    text_mode: _TextMode = _cached(tok, "text_mode", lambda: _TextMode(tok))
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for start, end, token_id in [*chat.controls, (len(chat.text), len(chat.text), None)]:
        if start > pos:
            piece_ids, piece_spans = text_mode.piece(chat.text[pos:start], pos)
            _check_no_control(tok, piece_ids)
            ids += piece_ids
            spans += piece_spans
        if token_id is not None:
            ids.append(token_id)
            spans.append((start, end))
        pos = end
    return ids, spans


def encode_content(
    tokenizer: Any, text: str, *, add_special_tokens: bool = False, allow_special: bool = False
) -> list[int]:
    """Ids of text that is content, not a rendered template (a document, a completion): any
    special-token text in it is plain text. ``add_special_tokens``: the tokenizer's own BOS/EOS
    framing, as ``tokenizer(text)`` adds it."""
    tok = hf_tokenizer(tokenizer)
    if allow_special or not _controls(tok).pattern.search(text):
        return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    text_mode: _TextMode = _cached(tok, "text_mode", lambda: _TextMode(tok))
    body, _ = text_mode.encode(text)
    _check_no_control(tok, body)
    if not add_special_tokens:
        return body
    return list(text_mode.tok.encode(text, add_special_tokens=True).ids)


def _check_no_control(tok: Any, ids: Sequence[int]) -> None:
    leaked = set(_controls(tok).ids.values()).intersection(ids)
    if leaked:
        name = tok.convert_ids_to_tokens(min(leaked))
        raise MlxLoraError(
            f"the tokenizer makes its control token {name!r} out of plain text, so "
            "contents cannot be kept apart from it; pass --allow-special-tokens-in-content"
        )


@dataclass(frozen=True)
class ChatIds:
    """Prompt ids and the special-token texts of contents that were encoded as plain text."""

    ids: list[int]
    escaped: Counter[str]


def encode_chat(
    tokenizer: Any,
    messages: list[Message],
    *,
    add_generation_prompt: bool = True,
    allow_special: bool = False,
) -> ChatIds:
    """The one encoder of conversations: the template's special tokens become control ids, every
    message content (system, user, assistant, tool) is text. ``allow_special`` parses special
    tokens in contents too (``--allow-special-tokens-in-content``)."""
    chat = render_chat(
        tokenizer,
        messages,
        add_generation_prompt=add_generation_prompt,
        allow_special=allow_special,
    )
    return ChatIds(tokenize_chat(tokenizer, chat, offsets=False)[0], chat.escaped)


def encode_prompt(
    tokenizer: Any,
    messages: list[Message],
    system_prompt: str | None = None,
    *,
    allow_special: bool = False,
) -> ChatIds:
    """:func:`build_prompt` plus the special-token texts encoded as text (serve logs them)."""
    return encode_chat(tokenizer, with_system(messages, system_prompt), allow_special=allow_special)


def build_prompt(
    tokenizer: Any,
    messages: list[Message],
    system_prompt: str | None = None,
    *,
    allow_special: bool = False,
) -> list[int]:
    """Prompt ids for the next assistant answer: what chat, serve and verify feed the model."""
    return encode_prompt(tokenizer, messages, system_prompt, allow_special=allow_special).ids


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


def _assistant_span(text: str, content: str, cursor: int, eot: str) -> tuple[int, int, bool]:
    """Where the assistant's ``content`` and its end-of-turn token lie in ``text`` (at or after
    ``cursor``); the flag says the template left the last turn open and ``eot`` must be added."""
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
        return start, end + eot_at + len(eot), False
    if not gap.strip():
        return start, len(text) + len(eot), True
    raise MlxLoraError(
        f"the chat template does not close assistant turns with {eot!r}; use --format text"
    )


def encode_conversation(
    tokenizer: Any,
    messages: list[Message],
    system_prompt: str | None = None,
    eot: str | None = None,
    *,
    allow_special: bool = False,
) -> Encoded:
    """Ids of a whole conversation and a mask over every assistant turn plus its end-of-turn token.

    The text is the template's rendering of the whole conversation, encoded once by the same
    encoder as :func:`build_prompt` (so each prefix is exactly a prompt chat would build). A
    template that leaves the last assistant turn open (Qwen1.5 does, for prefill) gets the
    end-of-turn token appended: a model that never sees it never learns to stop. Special-token
    text inside an answer is part of the answer, as text: masked, not an end of turn.
    """
    tok = hf_tokenizer(tokenizer)
    eot = eot or end_of_turn(tok)
    msgs = with_system(messages, system_prompt)
    chat = render_chat(tok, msgs, add_generation_prompt=False, allow_special=allow_special)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, msgs[:i], add_generation_prompt=True)
        if chat.text.startswith(prefix):
            cursor = max(cursor, len(prefix))
        start, end, close = _assistant_span(chat.text, m["content"], cursor, eot)
        if close:
            chat.close_turn(eot, _controls(tok).ids.get(eot))
        spans.append((start, end))
        cursor = end
    ids, offsets = tokenize_chat(tok, chat)
    mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    return Encoded(ids, mask)
