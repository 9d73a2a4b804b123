"""The Ollama TEMPLATE (Go ``text/template``), measured from the model's own Jinja chat template.

The seed wrote its Modelfile by hand and put Llama-3 tokens on a Qwen model, so Ollama served
prompts the model had never seen. Here the TEMPLATE is *measured*, not chosen by name: probe
conversations with unique markers are rendered through the Jinja template (:func:`prompt.probe`);
the text between the markers gives the pieces every prompt is made of (a head before the first
message, a separator for each pair of neighbouring roles, a tail with the generation prompt). Three
placements of the system text are tried: its own turn (ChatML, Llama 3, Phi-3, DeepSeek-R1), the
first user turn (Gemma, whose templates refuse system messages: Gemma 3's layout, text and a blank
line), and the last user turn (Mistral Nemo). The pieces are measured once per
``enable_thinking`` value (unset, true, false); where they differ (Qwen3's empty think block,
SmolLM3's reasoning header) the Go template branches on Ollama's ``.IsThinkSet``/``.Think``. A
date the template formats (Llama 3.2's ``strftime_now``) becomes Ollama's ``currentDate`` in the
same format.

A structure is accepted only after its rendering reproduces the Jinja template on
:func:`check_conversations` (24 conversations, with and without a system message, one to four
turns) under every ``enable_thinking`` value; the Go template is written from the same pieces by
:func:`_go_source`, which the tests execute with Go's own ``text/template`` against the Jinja
template. A template that passes no structure is refused with a pointer to ``--template FILE``.

How Ollama runs the TEMPLATE (its ``server/routes.go`` and ``template/template.go``): a chat request
whose first message is not a system message gets the Modelfile SYSTEM as one; consecutive messages
of one role are joined with a blank line; a template that mentions ``.Messages`` is executed once
with ``.Messages`` (``.Role``, ``.Content``, ``.Thinking``), ``.System`` (all system texts joined),
``.Think``, ``.IsThinkSet``; and the rendered text is tokenized with special tokens parsed, with
BOS added by llama.cpp iff the GGUF says ``tokenizer.ggml.add_bos_token``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.gguf.vocab import adds_bos
from mlx_lora.model.prompt import (
    DATE_MARKER,
    UnrecognisedTemplate,
    chat_template_of,
    hf_tokenizer,
    probe,
    render_template,
)

# "other": a structure that reproduces its template but whose markers no family here names; its
# stops are the special tokens that end an assistant turn and open the next user turn.
FAMILIES = ("chatml", "llama3", "llama2", "mistral", "gemma", "phi3", "deepseek", "other")

# End-of-turn and turn-start tokens per family: Ollama stops on these strings so the model cannot
# run on into a turn of its own invention (the seed's Qwen Modelfile stopped on Llama-3 tokens).
_FAMILY_STOPS = {
    "chatml": ["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "llama2": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
    "mistral": ["[INST]", "[/INST]"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"],
    "deepseek": ["<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
}

TEMPLATE_HINT = (
    "write the Ollama TEMPLATE yourself (Go text/template using .Messages) and pass it with "
    "--template FILE"
)
RAW_TEMPLATE = "{{ .Prompt }}"

# enable_thinking as the Jinja template sees it, per Ollama request: no think option, think true,
# think false (Ollama: IsThinkSet false; IsThinkSet and Think; IsThinkSet and not Think).
THINK_MODES: dict[str, dict[str, bool]] = {
    "unset": {},
    "on": {"enable_thinking": True},
    "off": {"enable_thinking": False},
}


@dataclass(frozen=True)
class GoTemplate:
    """An Ollama TEMPLATE plus what the Modelfile needs to go with it.

    ``template`` is Go ``text/template`` over ``.Messages``; ``default_system`` is the system prompt
    the chat template adds by itself when a conversation has none (Qwen2.5: "You are Qwen, ...");
    ``stops`` are the end/turn tokens generation must stop on. ``add_bos`` is the GGUF's
    ``tokenizer.ggml.add_bos_token`` (None: unknown, e.g. ``--template FILE``); ``bos`` the
    tokenizer's BOS text. ``leading_bos`` is the BOS text the Jinja template starts every prompt
    with and the Go template leaves out because llama.cpp prepends BOS itself (``add_bos``);
    when ``add_bos`` is false the Go template writes it, as SmolLM2's must. ``system_role`` is
    False when the Jinja template refuses system messages (Gemma 1/2): a system text then opens the
    first user message, followed by a blank line; ``system_placement`` says where system text goes
    ("turn", "first_user", "last_user"). ``trims_content`` is True when the Jinja template strips
    whitespace around message contents, which Go templates cannot do: prompts then agree only for
    contents without leading/trailing whitespace. ``think`` is True when the template reacts to
    ``enable_thinking`` and the Go template follows Ollama's ``think`` option. ``starts_with_bos``:
    the Jinja template's prompts start with the BOS text. ``ollama_prefers_gguf``: the Jinja
    template declares tools or thinking by Ollama's reading, so Ollama >= 0.30 runs the GGUF's own
    chat template (in llama-server) instead of this TEMPLATE unless ``OLLAMA_GO_TEMPLATE=1``.
    """

    template: str
    default_system: str | None
    stops: list[str]
    family: str = "custom"
    leading_bos: str | None = None
    system_role: bool = True
    trims_content: bool = False
    add_bos: bool | None = None
    bos: str | None = None
    system_placement: str = "turn"
    think: bool = False
    starts_with_bos: bool = False
    ollama_prefers_gguf: bool = False

    @property
    def raw(self) -> bool:
        """The raw-prompt TEMPLATE of a model without a chat template."""
        return self.template == RAW_TEMPLATE


def raw_prompt_template(bos: str | None = None, add_bos: bool | None = None) -> GoTemplate:
    """``{{ .Prompt }}``: what a base model (no chat template) gets; Ollama sends the text as is."""
    return GoTemplate(RAW_TEMPLATE, None, [], family="raw", add_bos=add_bos, bos=bos)


# ---------------------------------------------------------------------------------------------
# Measuring the template's structure


@dataclass(frozen=True)
class _Structure:
    """Prompt = head(first role) + c0 + sep(r0, r1) + c1 + ... + cN + tail(last role).

    ``placement`` "turn": the system text is a message of its own (``head_system``,
    ``sep_system_user``); "first_user": it opens the first user message (``head_system`` is the user
    head, ``sep_system_user`` the blank line); "last_user": the last user message, when the
    conversation ends with one, starts with ``sys_open`` + system + ``sep_system_user``.
    """

    head_user: str
    head_system: str
    sep_system_user: str
    sep_user_assistant: str
    sep_assistant_user: str
    tail_user: str
    tail_system: str
    placement: str = "turn"
    sys_open: str = ""


_PIECES = (
    "head_user",
    "head_system",
    "sep_system_user",
    "sep_user_assistant",
    "sep_assistant_user",
    "tail_user",
    "tail_system",
    "sys_open",
)


def _turns(chat_template: str, special: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(head, user→assistant separator, assistant→user separator, tail) without a system text."""
    head_u, tail_u = probe(chat_template, ["user"], special)
    p = probe(chat_template, ["user", "assistant", "user2"], special)
    if p[0] != head_u or p[3] != tail_u:
        raise UnrecognisedTemplate(
            "the first or last turn changes with the length of the conversation"
        )
    return head_u, p[1], p[2], tail_u


def _measure_turn(chat_template: str, special: Mapping[str, Any]) -> _Structure:
    """System text as a turn of its own; in the first user turn when the template refuses it."""
    head_u, sep_ua, sep_au, tail_u = _turns(chat_template, special)
    if _refuses_system(chat_template, special):  # raise_exception('System role not supported')
        return _Structure(head_u, head_u, "\n\n", sep_ua, sep_au, tail_u, "", "first_user")
    head_s, sep_su, tail = probe(chat_template, ["system", "user"], special)
    if tail != tail_u:
        raise UnrecognisedTemplate("the generation prompt changes when there is a system message")
    try:
        head_s2, tail_s = probe(chat_template, ["system"], special)
        if head_s2 != head_s:
            tail_s = ""
    except UnrecognisedTemplate:
        tail_s = ""
    return _Structure(head_u, head_s, sep_su, sep_ua, sep_au, tail_u, tail_s)


def _refuses_system(chat_template: str, special: Mapping[str, Any]) -> bool:
    """Whether the template raises for a conversation that starts with a system message."""
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        render_template(chat_template, msgs, add_generation_prompt=True, **special)
    except MlxLoraError:
        return True
    return False


def _measure_last_user(chat_template: str, special: Mapping[str, Any]) -> _Structure:
    """System text at the start of the last user turn (Mistral Nemo / v0.3)."""
    head_u, sep_ua, sep_au, tail_u = _turns(chat_template, special)
    head_s, sep_su, tail = probe(chat_template, ["system", "user"], special)
    if tail != tail_u or not head_s.startswith(head_u):
        raise UnrecognisedTemplate("the system text is not at the start of the last user turn")
    sys_open = head_s[len(head_u) :]
    roles = ["system", "user", "assistant", "user2"]
    order = ["user", "assistant", "system", "user2"]
    got = probe(chat_template, roles, special, text_order=order)
    if got != [head_u, sep_ua, sep_au + sys_open, sep_su, tail_u]:
        raise UnrecognisedTemplate("the system text is not at the start of the last user turn")
    return _Structure(head_u, head_u, sep_su, sep_ua, sep_au, tail_u, "", "last_user", sys_open)


def _expand_dates(text: str) -> str:
    """Today's date where a piece holds a :data:`DATE_MARKER` (as the Jinja ``strftime_now``)."""
    now = datetime.now()
    return DATE_MARKER.sub(lambda m: now.strftime(m.group(1)), text)


def _render_structure(st: _Structure, messages: Sequence[Mapping[str, str]]) -> str:
    """What the Go template written by :func:`_go_source` produces for ``messages`` as Ollama
    passes them (kept in step with it; the tests run both)."""
    out: list[str] = []
    prev = ""
    if st.placement == "last_user":
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        for i, msg in enumerate(messages):
            role = msg["role"]
            if role == "system":
                continue
            if prev == "":
                out.append(st.head_user)
            else:
                out.append(st.sep_user_assistant if role == "assistant" else st.sep_assistant_user)
            if system and role == "user" and i == len(messages) - 1:
                out += [st.sys_open, system, st.sep_system_user]
            out.append(msg["content"])
            prev = role
    else:
        for i, msg in enumerate(messages):
            role = msg["role"]
            if i == 0:
                out.append(st.head_system if role == "system" else st.head_user)
            elif prev == "system" and role == "user":
                out.append(st.sep_system_user)
            elif role == "assistant":
                out.append(st.sep_user_assistant)
            else:
                out.append(st.sep_assistant_user)
            out.append(msg["content"])
            prev = role
    if prev == "user":
        out.append(st.tail_user)
    elif prev == "system":
        out.append(st.tail_system)
    return _expand_dates("".join(out))


# Contents for the check: newlines inside, CJK, emoji, quotes, braces, Jinja and Go delimiters.
# No leading/trailing whitespace: templates that trim contents agree on these too.
_CHECK_TEXTS = [
    "你好，请介绍一下你自己。",
    "Hello!\nHow are you today?",
    "嬛嬛，朕今日甚是想念你 🌸",
    'She said "yes" and {{ left }} {% raw %} <b>bold</b>',
    "Line one\n\nLine three\twith a tab",
    "👍🏽 done — 100% sure \\ backslash",
    "多轮对话\n第二行",
    "OK",
]
_CHECK_SYSTEMS = [
    "You are Zhen Huan, a consort of the Yongzheng Emperor.",
    "系统：\n简洁回答。",
    "Answer in one sentence.",
]


def check_conversations() -> list[list[dict[str, str]]]:
    """The 24 conversations every derived TEMPLATE must reproduce (and verify checks): 1-4 user
    turns ending with a user message, three text mixes, each without and with a system message."""
    texts = _CHECK_TEXTS
    plain: list[list[dict[str, str]]] = []
    for turns in (1, 2, 3, 4):
        for offset in (0, 3, 5):
            conv = []
            for t in range(turns):
                conv.append({"role": "user", "content": texts[(offset + 2 * t) % len(texts)]})
                if t < turns - 1:
                    a = texts[(offset + 2 * t + 1) % len(texts)]
                    conv.append({"role": "assistant", "content": a})
            plain.append(conv)
    systems = [_CHECK_SYSTEMS[i % len(_CHECK_SYSTEMS)] for i in range(len(plain))]
    pairs = zip(systems, plain, strict=True)
    return plain + [[{"role": "system", "content": s}, *c] for s, c in pairs]


def fold_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A leading system text moved into the first user message, followed by a blank line: what
    the TEMPLATE does for templates without a system role (Gemma 3's own layout)."""
    msgs = [dict(m) for m in messages]
    if len(msgs) >= 2 and msgs[0]["role"] == "system" and msgs[1]["role"] == "user":
        first = msgs.pop(0)
        msgs[0]["content"] = first["content"] + "\n\n" + msgs[0]["content"]
    return msgs


def _check(chat_template: str, st: _Structure, special: Mapping[str, Any]) -> None:
    """Raise :class:`UnrecognisedTemplate` unless ``st`` reproduces the template on every check
    conversation."""
    for conv in check_conversations():
        ref = fold_system(conv) if st.placement == "first_user" else conv
        try:
            want = render_template(chat_template, ref, add_generation_prompt=True, **special)
        except MlxLoraError as e:
            raise UnrecognisedTemplate(str(e)) from None
        got = _render_structure(st, conv)
        if got != want:
            raise UnrecognisedTemplate(
                f"its output depends on more than the neighbouring roles "
                f"(for {len(conv)} messages it gives {want!r}, turn by turn {got!r})"
            )


def _classify(st: _Structure) -> str:
    text = st.head_user + st.sep_user_assistant + st.sep_assistant_user + st.tail_user
    if "<|im_start|>" in text and "<|im_end|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text and "<|eot_id|>" in text:
        return "llama3"
    if "<start_of_turn>" in text and "<end_of_turn>" in text:
        return "gemma"
    if "<|user|>" in text and "<|end|>" in text and "<|assistant|>" in text:
        return "phi3"
    if "<｜User｜>" in text and "<｜Assistant｜>" in text:
        return "deepseek"
    if "[INST]" in text and "[/INST]" in text:
        sys_text = st.head_system + st.sep_system_user if st.placement == "turn" else ""
        return "llama2" if "<<SYS>>" in sys_text else "mistral"
    if _turn_markers(st):
        return "other"
    raise UnrecognisedTemplate("no special token marks the end of an assistant turn")


# Special-token-looking text: <|end|>, <turn|>, <｜User｜>, <|start_of_role|>, [INST]
_SPECIAL = re.compile(r"<[^<>\s]{1,48}>|\[/?[A-Z][A-Z_]*\]")


def _turn_markers(st: _Structure) -> list[str]:
    """For a template of no known family: the first two special tokens between an assistant's
    text and the next user's, i.e. what ends an assistant turn and what opens a user turn (a
    model that writes either has finished its answer)."""
    return _SPECIAL.findall(st.sep_assistant_user)[:2]


@dataclass(frozen=True)
class _Analysis:
    family: str
    structures: dict[str, _Structure]  # per THINK_MODES key
    default_system: str | None
    trims_content: bool


_MEASURES: tuple[Callable[[str, Mapping[str, Any]], _Structure], ...] = (
    _measure_turn,
    _measure_last_user,
)


def _measure_all(chat_template: str, special: Mapping[str, Any]) -> dict[str, _Structure]:
    """The first placement whose structure passes the check under every think mode."""
    first_error: UnrecognisedTemplate | None = None
    for measure in _MEASURES:
        try:
            sts = {}
            for mode, kwargs in THINK_MODES.items():
                sp = {**special, **kwargs}
                sts[mode] = measure(chat_template, sp)
                _check(chat_template, sts[mode], sp)
            if len({st.placement for st in sts.values()}) != 1:
                raise UnrecognisedTemplate("enable_thinking moves the system text")
            return sts
        except UnrecognisedTemplate as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


@functools.lru_cache(maxsize=32)
def _analyse(chat_template: str, bos: str | None, eos: str | None) -> _Analysis:
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise MlxLoraError(
            f"the model has no chat template to derive an Ollama TEMPLATE from; {TEMPLATE_HINT}"
        )
    special = {"bos_token": bos, "eos_token": eos}
    try:
        sts = _measure_all(chat_template, special)
        family = _classify(sts["unset"])
        for st in sts.values():
            _go_source_checks(st)
    except MlxLoraError as e:  # UnrecognisedTemplate, or a check conversation the template refuses
        raise MlxLoraError(f"unrecognised chat template structure: {e}; {TEMPLATE_HINT}") from None
    defaults = {_default_system(st) for st in sts.values()}
    default = defaults.pop() if len(defaults) == 1 else None  # SmolLM3's depends on the think mode
    return _Analysis(family, sts, default, _trims(chat_template, sts["unset"], special))


def _default_system(st: _Structure) -> str | None:
    """The system prompt the template adds when a conversation has none (Qwen2.5's "You are
    Qwen, ..."): what the user-first head holds between the system head and separator."""
    h, s = st.head_system, st.sep_system_user
    if st.placement != "turn" or len(st.head_user) < len(h) + len(s):
        return None
    if st.head_user.startswith(h) and st.head_user.endswith(s):
        default = st.head_user[len(h) : len(st.head_user) - len(s)]
        return default if default and not DATE_MARKER.search(default) else None
    return None


def _trims(chat_template: str, st: _Structure, special: dict) -> bool:
    """Whether the template strips whitespace around contents (Go templates cannot)."""
    padded = [{"role": "user", "content": " padded \n"}]
    try:
        want = render_template(chat_template, padded, add_generation_prompt=True, **special)
    except MlxLoraError:
        return True
    return want != _render_structure(st, padded)


def detect_template_family(chat_template: str, bos_token: str | None, eos_token: str | None) -> str:
    """The family of ``chat_template`` (one of :data:`FAMILIES`).

    Decided from what the template renders for probe conversations, never from a model name, and
    only after the measured structure reproduced the template on the check conversations.
    Unknown structure raises :class:`MlxLoraError` pointing at ``--template FILE``.
    """
    return _analyse(chat_template, bos_token, eos_token).family


# ---------------------------------------------------------------------------------------------
# Writing the Go template


def _go_string(s: str) -> str:
    """A Go string literal for ``s`` (printable ASCII kept, everything else as \\U escapes)."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _text(s: str) -> str:
    """``s`` as template text; through an action when it would be read as (part of) a delimiter."""
    if "{{" in s or s.endswith("{") or s.startswith("}"):
        return "{{ " + _go_string(s) + " }}"
    return s


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NAMES = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_DATE = "(currentDate)"  # Ollama's: today as 2006-01-02, local time


def _month(names: Sequence[str]) -> str:
    arms = [f'eq (slice {_DATE} 5 7) "{i + 1:02d}" }}}}{n}' for i, n in enumerate(names)]
    return "{{ if " + "{{ else if ".join(arms) + "{{ end }}"


_DATE_CODES = {
    "%d": f"{{{{ slice {_DATE} 8 10 }}}}",
    "%m": f"{{{{ slice {_DATE} 5 7 }}}}",
    "%Y": f"{{{{ slice {_DATE} 0 4 }}}}",
    "%y": f"{{{{ slice {_DATE} 2 4 }}}}",
    "%-d": (
        f'{{{{ if eq (slice {_DATE} 8 9) "0" }}}}{{{{ slice {_DATE} 9 10 }}}}'
        f"{{{{ else }}}}{{{{ slice {_DATE} 8 10 }}}}{{{{ end }}}}"
    ),
    "%b": _month(_MONTHS),
    "%B": _month(_MONTH_NAMES),
    "%%": "%",
}


def _go_date(fmt: str) -> str:
    """Go template text giving today's date as ``strftime(fmt)`` would, from ``currentDate``."""
    out = []
    for part in re.split(r"(%-?.)", fmt):
        if part.startswith("%"):
            if part not in _DATE_CODES:
                raise UnrecognisedTemplate(f"it formats today's date with {part}")
            out.append(_DATE_CODES[part])
        elif part:
            out.append(_text(part))
    return "".join(out)


def _lit(s: str) -> str:
    """Template text for a piece: literal text, with dates as ``currentDate`` expressions."""
    out, pos = [], 0
    for m in DATE_MARKER.finditer(s):
        if m.start() > pos:
            out.append(_text(s[pos : m.start()]))
        out.append(_go_date(m.group(1)))
        pos = m.end()
    if pos < len(s):
        out.append(_text(s[pos:]))
    return "".join(out)


def _go_source_checks(st: _Structure) -> None:
    """Raise early for pieces the Go writer cannot express (an unsupported date format)."""
    for name in _PIECES:
        _lit(getattr(st, name))


def _piece(sts: Mapping[str, _Structure], name: str, strip: str = "") -> str:
    """The piece ``name`` as template text; branches on Ollama's think option where it differs."""

    def text(mode: str) -> str:
        s = getattr(sts[mode], name)
        return s[len(strip) :] if strip and s.startswith(strip) else s

    unset, on, off = text("unset"), text("on"), text("off")
    if unset == on == off:
        return _lit(unset)
    if unset == on:
        return (
            "{{ if and $.IsThinkSet (not $.Think) }}"
            + _lit(off)
            + "{{ else }}"
            + _lit(unset)
            + "{{ end }}"
        )
    return (
        "{{ if not $.IsThinkSet }}"
        + _lit(unset)
        + "{{ else if $.Think }}"
        + _lit(on)
        + "{{ else }}"
        + _lit(off)
        + "{{ end }}"
    )


def _go_source(sts: Mapping[str, _Structure], strip: str) -> str:
    """The Go template for the structures (one per think mode); ``strip`` (a BOS text that
    llama.cpp adds itself) is removed from the start of the heads."""

    def p(name: str) -> str:
        return _piece(sts, name, strip if name.startswith("head") else "")

    if sts["unset"].placement == "last_user":
        lines = [
            '{{- $prev := "" }}',
            "{{- range $i, $m := .Messages }}",
            '{{- if ne $m.Role "system" }}',
            '{{- if eq $prev "" }}'
            + p("head_user")
            + '{{ else if eq $m.Role "assistant" }}'
            + p("sep_user_assistant")
            + "{{ else }}"
            + p("sep_assistant_user")
            + "{{ end }}",
            '{{- if and $.System (eq $m.Role "user") (eq (len (slice $.Messages $i)) 1) }}'
            + p("sys_open")
            + "{{ $.System }}"
            + p("sep_system_user")
            + "{{ end }}",
            "{{- $m.Content }}",
            "{{- $prev = $m.Role }}",
            "{{- end }}",
            "{{- end }}",
            '{{- if eq $prev "user" }}' + p("tail_user") + "{{ end }}",
        ]
        return "\n".join(lines)
    return "\n".join(
        [
            '{{- $prev := "" }}',
            "{{- range $i, $m := .Messages }}",
            "{{- if eq $i 0 }}",
            '{{- if eq $m.Role "system" }}'
            + p("head_system")
            + "{{ else }}"
            + p("head_user")
            + "{{ end }}",
            '{{- else if and (eq $prev "system") (eq $m.Role "user") }}'
            + p("sep_system_user")
            + '{{ else if eq $m.Role "assistant" }}'
            + p("sep_user_assistant")
            + "{{ else }}"
            + p("sep_assistant_user")
            + "{{ end }}",
            "{{- $m.Content }}",
            "{{- $prev = $m.Role }}",
            "{{- end }}",
            '{{- if eq $prev "user" }}'
            + p("tail_user")
            + '{{ else if eq $prev "system" }}'
            + p("tail_system")
            + "{{ end }}",
        ]
    )


def ollama_prefers_gguf_template(chat_template: str) -> bool:
    """Ollama's test (server/images.go, v0.30+) for a GGUF chat template with tools or thinking
    capabilities; a Go TEMPLATE without ``.Tools``/``.Thinking`` then has fewer, so Ollama sets
    PreferChatTemplate and bypasses the TEMPLATE (see its "template selection" log line)."""
    tools = "tools" in chat_template or "tool_call" in chat_template
    thinking = "<think>" in chat_template and "</think>" in chat_template
    split = "content.split('</think>')" in chat_template or 'content.split("</think>")' in (
        chat_template
    )
    if split and "reasoning_content" not in chat_template and "<SPECIAL_12>" not in chat_template:
        thinking = True
    return tools or thinking


def go_template_for(
    chat_template: str,
    bos_token: str | None,
    eos_token: str | None,
    *,
    add_bos: bool,
) -> GoTemplate:
    """An Ollama TEMPLATE equivalent to ``chat_template`` (with ``add_generation_prompt=True``).

    ``add_bos`` is the ``tokenizer.ggml.add_bos_token`` of the GGUF the Modelfile serves
    (:func:`mlx_lora.gguf.vocab.adds_bos`): when true, llama.cpp puts BOS in front of every prompt
    and a leading BOS text of the Jinja template is left out of the Go template; when false the Go
    template writes it. For every conversation ending in a user message, with or without a system
    message, the Go template executed the way Ollama executes it (no think option; think true;
    think false) gives the Jinja template's text (``enable_thinking`` unset, true, false) minus
    that BOS. When the last message is the assistant's, the Go template leaves it open, which is
    how Ollama continues a partial answer.
    """
    a = _analyse(chat_template, bos_token, eos_token)
    heads = [s for st in a.structures.values() for s in (st.head_user, st.head_system)]
    starts_with_bos = bool(bos_token) and all(h.startswith(bos_token) for h in heads)
    strip = bos_token if add_bos and starts_with_bos else ""
    st = a.structures["unset"]
    stops = list(_FAMILY_STOPS.get(a.family) or _turn_markers(st))
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return GoTemplate(
        template=_go_source(a.structures, strip),
        default_system=a.default_system,
        stops=stops,
        family=a.family,
        leading_bos=strip or None,
        system_role=st.placement != "first_user",
        trims_content=a.trims_content,
        add_bos=add_bos,
        bos=bos_token,
        system_placement=st.placement,
        think=len(set(a.structures.values())) > 1,
        starts_with_bos=starts_with_bos,
        ollama_prefers_gguf=ollama_prefers_gguf_template(chat_template),
    )


def go_template_for_tokenizer(tokenizer: Any, *, add_bos: bool | None = None) -> GoTemplate:
    """:func:`go_template_for` with the template and special tokens of an HF/mlx-lm tokenizer;
    ``add_bos`` defaults to what the GGUF writer records for that tokenizer. A tokenizer without a
    chat template (a base model) gets :func:`raw_prompt_template`."""

    tok = hf_tokenizer(tokenizer)
    if add_bos is None:
        add_bos = adds_bos(tok)
    bos = getattr(tok, "bos_token", None)
    template = chat_template_of(tok)
    if template is None:
        return raw_prompt_template(bos, add_bos)
    return go_template_for(template, bos, getattr(tok, "eos_token", None), add_bos=add_bos)
