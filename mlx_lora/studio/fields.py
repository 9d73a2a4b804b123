"""What the page sends, checked before it reaches a command: JSON types, numbers, names.

The browser is not trusted to send what the page's own forms send. A value of the wrong JSON type
(a list where text belongs, ``true`` where a number belongs), a number no setting can mean (over
2**53, infinite), text with a NUL, or a name that would become a folder outside its run (``..``,
``/``, an absolute path) is refused here with a one-line :class:`MlxLoraError`, so no command
is started with it and no file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, get_args, get_type_hints

from mlx_lora.core.errors import MlxLoraError

MAX_NUMBER = 2**53  # larger integers lose precision in the page's JavaScript; no setting needs one
NAME_CHARS = 100  # a name that becomes a folder or file: at most this many characters …
NAME_BYTES = 200  # … and this many bytes in UTF-8 (file names stop at 255)
# Letters and digits of any script, then also space and . , + = @ ( ) [ ] - ; no trailing space.
_NAME = re.compile(r"\w(?:[\w .,+=@()\[\]-]*[\w.,+=@()\[\]-])?")


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object; NaN, Infinity and numbers too long to parse are refused."""
    try:
        data = json.loads(raw or b"{}", parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise MlxLoraError("the request is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, a 5000-digit integer, NaN
        raise MlxLoraError(f"the request is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MlxLoraError(f"the request must be a JSON object, not {kind(data)}")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large")
    return value


def kind(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages."""
    names = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    names |= {list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def text(body: dict, key: str, default: str | None = None) -> str | None:
    """``body[key]`` as text; absent, null or empty = ``default``."""
    value = body.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise MlxLoraError(f"{key}: expected text, got {kind(value)}")
    if "\x00" in value:
        raise MlxLoraError(f"{key}: contains a NUL character")
    return value


def integer(body: dict, key: str, default: int, low: int, high: int) -> int:
    """``body[key]`` as a whole number in ``[low, high]`` (the page sends numbers as text)."""
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MlxLoraError(f"{key}: expected a number, got {kind(value)}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        number = None
    if number is None:
        raise MlxLoraError(f"{key}: {str(value)[:40]!r} is not a whole number")
    if not low <= number <= high:
        raise MlxLoraError(f"{key}: must be between {low} and {high}, got {str(number)[:40]}")
    return number


def flag(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the setting's type (``str``, ``int``, ``float``, ``bool``, or
    ``"tristate"``); the page sends numbers as text, which the command's parser then reads."""
    if isinstance(value, str):
        if "\x00" in value:
            raise MlxLoraError(f"{key}: contains a NUL character")
        if tp is bool:
            raise MlxLoraError(f"{key}: expected true or false, got text")
        return value
    if isinstance(value, bool):
        if tp in (bool, "tristate"):
            return value
        raise MlxLoraError(f"{key}: expected {_WANT.get(tp, 'a number')}, got true/false")
    if not isinstance(value, int | float) or tp not in (int, float):
        raise MlxLoraError(f"{key}: expected {_WANT.get(tp, 'a number')}, got {kind(value)}")
    if abs(value) > MAX_NUMBER:
        raise MlxLoraError(f"{key}: {value:.3g} is too large")
    if tp is int and isinstance(value, float):
        if not value.is_integer():
            raise MlxLoraError(f"{key}: expected a whole number, got {value}")
        return int(value)
    return value


_WANT = {bool: "true or false", "tristate": "auto, on or off", str: "text"}


def setting_types(cls: type) -> dict[str, Any]:
    """Field name → the type :func:`flag` checks against (``Optional`` unwrapped)."""
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = [a for a in get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = "tristate" if f.metadata.get("tristate") else (args or [hints[f.name]])[0]
    return out


def check_numbers(cfg: Any) -> None:
    """Every number of a parsed config is finite and at most 2**53 (text such as ``"1e999"``
    parses as infinity, ``"9" * 30`` as an integer no setting can use)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value) or abs(value) > MAX_NUMBER:
            raise MlxLoraError(f"{f.name}: {value:.3g} is out of range")


def folder_name(value: Any, key: str) -> str | None:
    """A name that becomes a folder or file (a tracker run, a project, an export): one path
    component of letters, digits, space and ``. , + = @ ( ) [ ] -``, starting with a letter or
    digit, without ``..``, at most 100 characters (200 bytes). Absent/empty = None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MlxLoraError(f"{key}: expected a name, got {kind(value)}")
    if len(value) > NAME_CHARS or len(value.encode("utf-8", "replace")) > NAME_BYTES:
        raise MlxLoraError(f"{key}: longer than {NAME_CHARS} characters; choose a shorter name")
    if ".." in value or not _NAME.fullmatch(value):
        raise MlxLoraError(
            f"{key}: {value[:40]!r} is not a plain name; use letters, digits, spaces and . , + = "
            "@ ( ) [ ] - (no '/', '\\', '..' or control characters; it names a folder)"
        )
    return value
