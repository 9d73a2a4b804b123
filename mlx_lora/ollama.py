"""An Ollama Modelfile derived from the model's own chat template, and ``ollama create``.

The seed wrote its Modelfile by hand and put Llama-3 tokens on a Qwen model, so Ollama served
prompts the model had never seen. Here the TEMPLATE is *measured*, not chosen by name: probe
conversations with unique markers are rendered through the Jinja chat template, the text between
the markers gives the pieces every turn is made of (a head before the first message, a separator
for each pair of neighbouring roles, a tail with the generation prompt), and the resulting model is
checked against the Jinja template on a set of conversations (system or not, several turns, Chinese,
emoji, newlines) before a Go ``text/template`` is written from the same pieces. The pieces then name
the family (ChatML/Qwen, Llama-3, Llama-2, Mistral, Gemma); anything else is refused with a pointer
to ``--template FILE``.

How Ollama runs that TEMPLATE (its ``server/routes.go`` and ``template/template.go``): when a chat
request does not start with a system message and the Modelfile has a SYSTEM, a system message with
that text is put first; consecutive messages of one role are joined with a blank line; a template
that mentions ``.Messages`` is executed once with ``.Messages`` (each ``.Role``, ``.Content``),
``.System`` (all system contents joined) and ``.Response`` = "". The template itself must therefore
add the generation prompt after the last user message.

How Ollama reads a Modelfile (its ``parser/parser.go``): a value is a bare word, ``"..."`` or
``\"\"\"...\"\"\"``; there are **no escape sequences**. A quoted value ends at the first line end
where the text so far (trimmed) is a complete quoted string, and every character that Go's
``strconv.IsPrint`` rejects is silently dropped (except space, tab, CR and LF inside an open
quote).
:func:`quote_value` picks a delimiter under which the value survives exactly, and raises
:class:`MlxLoraError` for the rare value that cannot survive (e.g. a zero-width joiner).
"""

from __future__ import annotations

import functools
import math
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.errors import MlxLoraError
from mlx_lora.files import write_text_atomic
from mlx_lora.meta import sampling_defaults
from mlx_lora.prompt import (
    UnrecognisedTemplate,
    chat_template_of,
    hf_tokenizer,
    probe,
    render_template,
)

FAMILIES = ("chatml", "llama3", "llama2", "mistral", "gemma")

# End-of-turn and turn-start tokens per family: Ollama stops on these strings so the model cannot
# run on into a turn of its own invention (the seed's Qwen Modelfile stopped on Llama-3 tokens).
_FAMILY_STOPS = {
    "chatml": ["<|im_end|>", "<|endoftext|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "llama2": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
    "mistral": ["[INST]", "[/INST]"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
}

_TEMPLATE_HINT = (
    "write the Ollama TEMPLATE yourself (Go text/template using .Messages) and pass it with "
    "--template FILE"
)


@dataclass(frozen=True)
class GoTemplate:
    """An Ollama TEMPLATE plus what the Modelfile needs to go with it.

    ``template`` is Go ``text/template`` over ``.Messages``; ``default_system`` is the system prompt
    the chat template adds by itself when a conversation has none (Qwen1.5: "You are a helpful
    assistant"); ``stops`` are the end/turn tokens generation must stop on. ``leading_bos`` is the
    BOS text the Jinja template starts every prompt with and that the Go template leaves out,
    because llama.cpp/Ollama prepend BOS themselves when the GGUF says ``add_bos_token`` (writing it
    too would give two BOS tokens). ``system_role`` is False when the Jinja template refuses system
    messages (Gemma 1/2, Mistral v0.1): the Go template then puts a system text before the first
    user message, separated by a blank line, as Gemma 3 does. ``trims_content`` is True when the
    Jinja template strips whitespace around message contents, which Go templates cannot do: prompts
    then agree only for contents without leading/trailing whitespace.
    """

    template: str
    default_system: str | None
    stops: list[str]
    family: str = "custom"
    leading_bos: str | None = None
    system_role: bool = True
    trims_content: bool = False


# ---------------------------------------------------------------------------------------------
# Rendering the Jinja chat template exactly as transformers does


# Measuring the template's structure


@dataclass(frozen=True)
class _Structure:
    """Prompt = head(first role) + c0 + sep(r0, r1) + c1 + ... + cN + tail(last role)."""

    head_user: str
    head_system: str
    sep_system_user: str
    sep_user_assistant: str
    sep_assistant_user: str
    tail_user: str
    tail_system: str
    system_role: bool


def _measure(chat_template: str, special: Mapping[str, Any]) -> _Structure:
    """The pieces every prompt of ``chat_template`` is made of, from marker conversations."""
    head_u, tail_u = probe(chat_template, ["user"], special)
    p = probe(chat_template, ["user", "assistant", "user2"], special)
    if p[0] != head_u or p[3] != tail_u:
        raise UnrecognisedTemplate(
            "the first or last turn changes with the length of the conversation"
        )
    sep_ua, sep_au = p[1], p[2]
    try:
        head_s, sep_su, tail = probe(chat_template, ["system", "user"], special)
    except UnrecognisedTemplate:  # raise_exception('System role not supported') and the like
        # Gemma 3's convention (and later Mistral templates'): the system text opens the first user
        # message, followed by a blank line. Only used if an Ollama request brings a system message.
        return _Structure(head_u, head_u, "\n\n", sep_ua, sep_au, tail_u, "", False)
    if tail != tail_u:
        raise UnrecognisedTemplate("the generation prompt changes when there is a system message")
    try:
        head_s2, tail_s = probe(chat_template, ["system"], special)
        if head_s2 != head_s:
            tail_s = ""
    except UnrecognisedTemplate:
        tail_s = ""
    return _Structure(head_u, head_s, sep_su, sep_ua, sep_au, tail_u, tail_s, True)


def _render_structure(st: _Structure, messages: Sequence[Mapping[str, str]]) -> str:
    """What the Go template written by :func:`_go_source` produces (kept in step with it)."""
    out: list[str] = []
    prev = ""
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
    return "".join(out)


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
_CHECK_SYSTEMS = ["You are Zhen Huan, a consort of the Yongzheng Emperor.", "系统：\n简洁回答。"]


def _check_conversations(with_system: bool) -> list[list[dict[str, str]]]:
    texts = _CHECK_TEXTS
    convs: list[list[dict[str, str]]] = []
    for turns in (1, 2, 3, 4):
        for offset in (0, 3):
            conv = []
            for t in range(turns):
                conv.append({"role": "user", "content": texts[(offset + 2 * t) % len(texts)]})
                if t < turns - 1:
                    conv.append(
                        {"role": "assistant", "content": texts[(offset + 2 * t + 1) % len(texts)]}
                    )
            convs.append(conv)
    if with_system:
        convs += [
            [{"role": "system", "content": _CHECK_SYSTEMS[i % 2]}, *c] for i, c in enumerate(convs)
        ]
    return convs


def _classify(st: _Structure) -> str:
    text = st.head_user + st.sep_user_assistant + st.sep_assistant_user + st.tail_user
    if "<|im_start|>" in text and "<|im_end|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text and "<|eot_id|>" in text:
        return "llama3"
    if "<start_of_turn>" in text and "<end_of_turn>" in text:
        return "gemma"
    if "[INST]" in text and "[/INST]" in text:
        sys_text = st.head_system + st.sep_system_user if st.system_role else ""
        return "llama2" if "<<SYS>>" in sys_text else "mistral"
    raise UnrecognisedTemplate(
        "its turn markers are not ChatML, Llama-3, Llama-2/Mistral or Gemma ones"
    )


@dataclass(frozen=True)
class _Analysis:
    family: str
    structure: _Structure
    default_system: str | None
    trims_content: bool


@functools.lru_cache(maxsize=16)
def _analyse(chat_template: str, bos: str | None, eos: str | None) -> _Analysis:
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise MlxLoraError(
            f"the model has no chat template to derive an Ollama TEMPLATE from; {_TEMPLATE_HINT}"
        )
    special = {"bos_token": bos, "eos_token": eos}
    try:
        st = _measure(chat_template, special)
        for conv in _check_conversations(st.system_role):
            want = render_template(chat_template, conv, add_generation_prompt=True, **special)
            got = _render_structure(st, conv)
            if got != want:
                raise UnrecognisedTemplate(
                    f"its output depends on more than the neighbouring roles "
                    f"(for {len(conv)} messages it gives {want!r}, turn by turn {got!r})"
                )
        family = _classify(st)
    except UnrecognisedTemplate as e:
        raise MlxLoraError(f"unrecognised chat template structure: {e}; {_TEMPLATE_HINT}") from None
    except MlxLoraError as e:  # a check conversation the template refuses
        raise MlxLoraError(f"unrecognised chat template structure: {e}; {_TEMPLATE_HINT}") from None
    return _Analysis(family, st, _default_system(st), _trims(chat_template, st, special))


def _default_system(st: _Structure) -> str | None:
    """The system prompt the template adds when a conversation has none (Qwen1.5's "You are a
    helpful assistant"): what the user-first head holds between the system head and separator."""
    h, s = st.head_system, st.sep_system_user
    if not st.system_role or len(st.head_user) < len(h) + len(s):
        return None
    if st.head_user.startswith(h) and st.head_user.endswith(s):
        return st.head_user[len(h) : len(st.head_user) - len(s)] or None
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
    """The family of ``chat_template`` ("chatml", "llama3", "llama2", "mistral" or "gemma").

    Decided from what the template renders for probe conversations, never from a model name, and
    only after the measured structure reproduced the template on a set of check conversations.
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


def _lit(s: str) -> str:
    """``s`` as template text; through an action when it would be read as (part of) a delimiter."""
    if "{{" in s or s.endswith("{"):
        return "{{ " + _go_string(s) + " }}"
    return s


def _go_source(st: _Structure, strip: str) -> str:
    """The Go template for ``st``; ``strip`` is removed from the start of the two heads."""

    def head(s: str) -> str:
        return s[len(strip) :] if strip and s.startswith(strip) else s

    return "\n".join(
        [
            '{{- $prev := "" }}',
            "{{- range $i, $m := .Messages }}",
            "{{- if eq $i 0 }}",
            '{{- if eq $m.Role "system" }}'
            + _lit(head(st.head_system))
            + "{{ else }}"
            + _lit(head(st.head_user))
            + "{{ end }}",
            '{{- else if and (eq $prev "system") (eq $m.Role "user") }}'
            + _lit(st.sep_system_user)
            + '{{ else if eq $m.Role "assistant" }}'
            + _lit(st.sep_user_assistant)
            + "{{ else }}"
            + _lit(st.sep_assistant_user)
            + "{{ end }}",
            "{{- $m.Content }}",
            "{{- $prev = $m.Role }}",
            "{{- end }}",
            '{{- if eq $prev "user" }}'
            + _lit(st.tail_user)
            + '{{ else if eq $prev "system" }}'
            + _lit(st.tail_system)
            + "{{ end }}",
        ]
    )


def go_template_for(
    chat_template: str,
    bos_token: str | None,
    eos_token: str | None,
    *,
    keep_leading_bos: bool = False,
) -> GoTemplate:
    """An Ollama TEMPLATE equivalent to ``chat_template`` (with ``add_generation_prompt=True``).

    For every conversation ending in a user message, with or without a system message, the Go
    template executed the way Ollama executes it gives the Jinja template's text, except that a
    BOS at the very start is left to the runtime (see :class:`GoTemplate`; ``keep_leading_bos``
    keeps it, for byte-for-byte comparisons). When the last message is the assistant's, the Go
    template leaves it open, which is how Ollama continues a partial answer.
    """
    a = _analyse(chat_template, bos_token, eos_token)
    st = a.structure
    strip = ""
    if (
        not keep_leading_bos
        and bos_token
        and st.head_user.startswith(bos_token)
        and st.head_system.startswith(bos_token)
    ):
        strip = bos_token
    stops = list(_FAMILY_STOPS[a.family])
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return GoTemplate(
        template=_go_source(st, strip),
        default_system=a.default_system,
        stops=stops,
        family=a.family,
        leading_bos=strip or None,
        system_role=st.system_role,
        trims_content=a.trims_content,
    )


def go_template_for_tokenizer(tokenizer: Any, *, keep_leading_bos: bool = False) -> GoTemplate:
    """:func:`go_template_for` with the template and special tokens of an HF/mlx-lm tokenizer."""
    tok = hf_tokenizer(tokenizer)
    return go_template_for(
        chat_template_of(tok) or "",
        getattr(tok, "bos_token", None),
        getattr(tok, "eos_token", None),
        keep_leading_bos=keep_leading_bos,
    )


def load_template_file(
    path: Path, stops: Iterable[str] = (), default_system: str | None = None
) -> GoTemplate:
    """A user-written TEMPLATE (``--template FILE``), used verbatim: the way out for chat templates
    :func:`go_template_for` does not recognise. Only a UTF-8 byte-order mark is dropped (Ollama's
    parser would drop it too); a final newline in the file is part of the template. ``stops`` (e.g.
    the model's eos tokens) and ``default_system`` go into the Modelfile as for a derived template.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxLoraError(
            f"cannot read the template file {path}: {e}; pass a UTF-8 text file"
        ) from None
    if not text.strip():
        raise MlxLoraError(f"the template file {path} is empty; write a Go text/template there")
    return GoTemplate(template=text, default_system=default_system, stops=_dedupe(stops))


# ---------------------------------------------------------------------------------------------
# Modelfile values


def _go_printable(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: letters, marks, numbers, punctuation, symbols and ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _is_complete(text: str) -> bool:
    """Whether Ollama's parser takes ``text`` (already trimmed) as a complete value."""
    if text.startswith('"""'):
        return len(text) >= 6 and text.endswith('"""')
    if text.startswith('"'):
        return len(text) >= 2 and text.endswith('"')
    return True


def _unquoted(text: str) -> str:
    if text.startswith('"""'):
        return text[3:-3]
    if text.startswith('"'):
        return text[1:-1]
    return text


_WS = " \t\r\n"


def _fits(delim: str, value: str) -> bool:
    """Whether ``delim + value + delim`` reads back as ``value``: the value must not look complete
    at any of its own line ends, and must look complete (and equal) at the end."""
    for i, ch in enumerate(value):
        if ch in "\r\n" and _is_complete((delim + value[:i]).strip(_WS)):
            return False
    whole = (delim + value + delim).strip(_WS)
    return _is_complete(whole) and _unquoted(whole) == value


def quote_value(value: str, what: str = "value") -> str:
    """``value`` quoted so that Ollama's Modelfile parser reads back exactly ``value``.

    Uses ``\"\"\"...\"\"\"`` for text with line breaks or quotes (Ollama's own convention) and
    ``"..."`` otherwise, falling back to the other form when the first would end early.
    Characters the parser drops (control and format characters such as NUL, ESC, U+200D,
    U+FEFF) and values no delimiter can hold raise :class:`MlxLoraError` naming ``what``.
    """
    if not isinstance(value, str):
        raise MlxLoraError(f"the Modelfile {what} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MlxLoraError(
            f"the Modelfile {what} is not valid Unicode (it holds a lone surrogate); fix the text"
        ) from None
    for ch in value:
        if not (ch in _WS or _go_printable(ch)):
            name = unicodedata.name(ch, "a control character")
            raise MlxLoraError(
                f"the Modelfile {what} contains U+{ord(ch):04X} ({name}), which Ollama's Modelfile "
                f"parser silently drops; remove it from the text"
            )
    order = ('"""', '"') if ("\n" in value or "\r" in value or '"' in value) else ('"', '"""')
    for delim in order:
        if _fits(delim, value):
            return delim + value + delim
    raise MlxLoraError(
        f"the Modelfile {what} cannot be written so that Ollama reads it back unchanged "
        f'(a line of it ends with a double quote, or with """); change that line ending'
    )


# ---------------------------------------------------------------------------------------------
# Modelfile


_PARAM_NAME = re.compile(r"[a-z][a-z0-9_]*")


# generation_config.json's names → Ollama's PARAMETER names
_OLLAMA_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}


def generation_params(generation_config: Mapping[str, Any]) -> dict[str, float | int]:
    """Ollama PARAMETERs from a ``generation_config.json``, so Ollama samples as the model's authors
    intended (:func:`mlx_lora.meta.sampling_defaults`: ``do_sample: false`` → temperature 0)."""
    if isinstance(generation_config, Mapping):
        generation_config = dict(generation_config)
    defaults = sampling_defaults(generation_config)
    return {_OLLAMA_PARAMS[k]: v for k, v in defaults.items()}


def _param_value(name: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise MlxLoraError(f"PARAMETER {name} must be a finite number, got {v!r}")
        return repr(v)
    if isinstance(v, str):
        return quote_value(v, f"PARAMETER {name}")
    raise MlxLoraError(
        f"PARAMETER {name} must be a number, a boolean or text, got {type(v).__name__}"
    )


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for s in items:
        if s and s not in seen:
            seen[s] = None
    return list(seen)


# Ollama renders TEMPLATE with Go text/template, which escapes nothing (template/template.go,
# server/prompt.go), and tokenizes the whole prompt with special-token parsing on: since v0.30
# llama-server's /completion (parse_special true, llm/llama_server.go), before that the llama.cpp
# runner (Tokenize(..., parseSpecial=true)) and the Go engine (splits on every control token). So
# "<|im_end|>" typed into a message is a control token there; read from Ollama v0.24.0 and v0.33.0.
CONTENT_WARNING = (
    "# Note: Ollama reads special-token text inside messages (e.g. <|im_end|>, <|im_start|>) as",
    "# control tokens, so a user can close their turn and write a system turn of their own. For",
    "# end users (e.g. Dify), serve with `python -m mlx_lora.serve`, which keeps message text as",
    "# text; use this Modelfile with trusted input only.",
)


def render_modelfile(
    *,
    from_path: str,
    template: GoTemplate,
    system: str | None = None,
    stops: Iterable[str] = (),
    num_ctx: int = 4096,
    params: Mapping[str, Any] | None = None,
    adapter_path: str | None = None,
) -> str:
    """The Modelfile text.

    ``from_path`` is what FROM names: ``./NAME.gguf`` for a full GGUF, or the base model's GGUF
    with ``adapter_path`` = ``./NAME-lora.gguf`` (relative paths are read by Ollama relative to
    the Modelfile). SYSTEM is ``system`` (the prompt used in training) or else the template's own
    default. Stops are the template's plus ``stops`` (e.g. every eos token of
    generation_config.json), each once. ``params`` are extra PARAMETERs (see
    :func:`generation_params`). Every value is quoted with :func:`quote_value`.
    """
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx <= 0:
        raise MlxLoraError(f"num_ctx must be a positive whole number of tokens, got {num_ctx!r}")
    if not from_path:
        raise MlxLoraError("the Modelfile needs a FROM path (the GGUF file)")
    params = dict(params or {})
    extra_stops = params.pop("stop", None)
    if isinstance(extra_stops, str):
        extra_stops = [extra_stops]
    all_stops = _dedupe([*template.stops, *stops, *(extra_stops or [])])
    params.pop("num_ctx", None)

    lines = [
        f"# Written by mlx_lora from the model's own chat template (family: {template.family}).",
        "# Create the model with: ollama create NAME -f Modelfile",
        *CONTENT_WARNING,
    ]
    if template.leading_bos:
        lines.append(
            f"# The prompt's leading {template.leading_bos} is added by Ollama (GGUF "
            "add_bos_token)."
        )
    lines.append(f"FROM {quote_value(from_path, 'FROM path')}")
    if adapter_path:
        lines.append(f"ADAPTER {quote_value(adapter_path, 'ADAPTER path')}")
    lines.append(f"TEMPLATE {quote_value(template.template, 'TEMPLATE')}")
    sys_prompt = system if system else template.default_system
    if sys_prompt:
        lines.append(f"SYSTEM {quote_value(sys_prompt, 'SYSTEM prompt')}")
    for s in all_stops:
        lines.append(f"PARAMETER stop {quote_value(s, 'stop token')}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    for name, v in params.items():
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
            raise MlxLoraError(
                f"PARAMETER name {name!r} is not one Ollama accepts (lowercase letters, digits, _)"
            )
        lines.append(f"PARAMETER {name} {_param_value(name, v)}")
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, *, filename: str = "Modelfile", **kwargs: Any) -> Path:
    """Write :func:`render_modelfile` (``kwargs``) to ``out_dir/filename`` atomically; its path."""
    text = render_modelfile(**kwargs)
    path = Path(out_dir) / filename
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise MlxLoraError(f"cannot write {path}: {e}; check the output directory") from None
    return path


# ---------------------------------------------------------------------------------------------
# ollama create

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _tail(raw: bytes, limit: int = 400) -> str:
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace"))
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    tail = " | ".join(lines[-4:])
    return tail[-limit:] if tail else "(no output on stderr)"


def ollama_create(name: str, modelfile: Path, quantize: str | None = None) -> None:
    """Run ``ollama create NAME -f Modelfile [-q QUANT]`` in the Modelfile's directory.

    ``ollama`` missing from PATH or a failed run raise :class:`MlxLoraError` with the exact command
    to run later; Ollama's own progress output is passed through to stderr.
    """
    if not name or any(c.isspace() for c in name):
        raise MlxLoraError(
            f"the Ollama model name {name!r} must be non-empty and contain no spaces"
        )
    modelfile = Path(modelfile).resolve()
    cmd = ["ollama", "create", name, "-f", str(modelfile)]
    if quantize:
        cmd += ["-q", quantize]
    shown = shlex.join(cmd)
    exe = shutil.which("ollama")
    if exe is None:
        raise MlxLoraError(
            "`ollama` is not on PATH, so the model was not created; install Ollama "
            f"(https://ollama.com/download), start it, then run: {shown}"
        )
    if not modelfile.is_file():
        raise MlxLoraError(
            f"the Modelfile {modelfile} does not exist; write it before `ollama create`"
        )
    stderr_tail: deque[bytes] = deque(maxlen=64)
    try:
        proc = subprocess.Popen([exe, *cmd[1:]], cwd=modelfile.parent, stderr=subprocess.PIPE)
    except OSError as e:
        raise MlxLoraError(f"could not start ollama ({e}); run it yourself: {shown}") from None
    assert proc.stderr is not None
    err_out = getattr(sys.stderr, "buffer", None)
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        stderr_tail.append(chunk)
        if err_out is not None:
            err_out.write(chunk)
            err_out.flush()
    code = proc.wait()
    if code != 0:
        raise MlxLoraError(
            f"`{shown}` failed with exit code {code}: {_tail(b''.join(stderr_tail))}; "
            "fix the cause and run the command again"
        )


__all__ = [
    "FAMILIES",
    "GoTemplate",
    "detect_template_family",
    "generation_params",
    "go_template_for",
    "go_template_for_tokenizer",
    "load_template_file",
    "ollama_create",
    "quote_value",
    "render_modelfile",
    "write_modelfile",
]
