"""An Ollama Modelfile for an export, and ``ollama create``.

The TEMPLATE comes from :mod:`mlx_lora.ollama.template` (measured from the model's own chat
template and
checked against it); SYSTEM is the training system prompt or the template's own default; stops are
the template family's end/turn tokens plus the model's end tokens; sampling PARAMETERs come from
``generation_config.json``. ``{{ .Prompt }}`` serves a model without a chat template.

How Ollama reads a Modelfile (its ``parser/parser.go``): a value is a bare word, ``"..."`` or
``\"\"\"...\"\"\"``; there are **no escape sequences**. A quoted value ends at the first line end
where the text so far (trimmed) is a complete quoted string, and every character that Go's
``strconv.IsPrint`` rejects is silently dropped (except space, tab, CR and LF inside an open
quote).
:func:`quote_value` picks a delimiter under which the value survives exactly, and raises
:class:`MlxLoraError` for the rare value that cannot survive (e.g. a zero-width joiner).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import write_text_atomic
from mlx_lora.model.meta import sampling_defaults
from mlx_lora.ollama.template import (
    FAMILIES,
    GoTemplate,
    detect_template_family,
    go_template_for,
    go_template_for_tokenizer,
    raw_prompt_template,
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
    intended (:func:`mlx_lora.model.meta.sampling_defaults`: ``do_sample: false`` → temperature
    0)."""
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


def _header(t: GoTemplate) -> list[str]:
    """Comment lines: where the TEMPLATE came from and who writes the prompt's BOS."""
    if t.raw:
        return ["# Written by mlx_lora. The model has no chat template: prompts are sent as is."]
    lines = [f"# Written by mlx_lora from the model's own chat template (family: {t.family})."]
    if t.leading_bos:
        lines.append(
            f"# The GGUF says add_bos_token = true: llama.cpp puts the prompt's leading "
            f"{t.leading_bos} in front, so the TEMPLATE leaves it out."
        )
    elif t.starts_with_bos and t.add_bos is False:
        lines.append(
            f"# The GGUF says add_bos_token = false: the TEMPLATE writes the prompt's leading "
            f"{t.bos} itself."
        )
    elif t.bos and t.add_bos and not t.starts_with_bos:
        lines.append(
            f"# Note: the GGUF says add_bos_token = true, so llama.cpp puts {t.bos} before every "
            "prompt, although the chat template does not start with it."
        )
    if t.ollama_prefers_gguf:
        lines.append(
            "# Ollama >= 0.30 runs the GGUF's own chat template instead of this TEMPLATE (that "
            "template declares tools/thinking); OLLAMA_GO_TEMPLATE=1 makes it use this one."
        )
    if t.think:
        lines.append(
            "# Ollama's think option: none = the chat template's default, false = "
            "enable_thinking false (true is refused: this TEMPLATE has no .Thinking)."
        )
    return lines


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
        *_header(template),
        "# Create the model with: ollama create NAME -f Modelfile",
        *CONTENT_WARNING,
    ]
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
    "raw_prompt_template",
    "load_template_file",
    "ollama_create",
    "quote_value",
    "render_modelfile",
    "write_modelfile",
]
