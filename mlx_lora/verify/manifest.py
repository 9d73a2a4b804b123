"""``OUT/export.json``: what an export wrote, read by verify and the studio.

One class, :class:`Manifest`: the export pipeline builds one and calls :meth:`Manifest.write`;
verify and the studio call :meth:`Manifest.read`. verify adds its findings through the same class
(``quality``, ``verify``) and writes it back. Paths inside the export folder are stored relative to
it, the others absolute, as the pipeline wrote them; :meth:`Manifest.path` resolves either.
This module sits below :mod:`mlx_lora.export` (verify reads it) and must not import it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json, write_error_detail, write_json_atomic

MANIFEST = "export.json"  # what was written; `python -m mlx_lora.verify --export-dir` reads it
_REEXPORT = "re-run python -m mlx_lora.export --overwrite into that folder"
_ADDED_LATER = ("quality", "verify")  # keys verify adds to the file


@dataclass
class Manifest:
    """What one export wrote (the keys of ``export.json``, in the file's order)."""

    name: str
    format: str  # gguf or mlx
    mode: str  # full or adapter
    gguf_type: str | None  # None for --format mlx
    gguf: str | None  # the model GGUF (full) or the base GGUF (adapter mode)
    lora_gguf: str | None
    mlx_dir: str | None
    hf_dir: str  # the folder the export was written from: fused folder, or the base
    base_dir: str
    adapter: str | None
    modelfile: str | None
    num_ctx: int | None
    system_prompt: str | None
    stops: list[str]
    quantization: dict | None
    eval_data: str | None
    # Added by verify; absent from the file until it has run.
    quality: dict | None = None  # mlx_lora.eval.quality.Quality.to_json() of a quantized export
    verify: dict | None = None  # mlx_lora.verify.checks.Report.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``export.json`` (verify's keys only once verify has set them)."""
        data = dataclasses.asdict(self)
        for key in _ADDED_LATER:
            if data[key] is None:
                del data[key]
        return data

    def write(self, out_dir: Path) -> Path:
        """Write ``out_dir/export.json`` atomically; returns its path."""
        path = Path(out_dir) / MANIFEST
        try:
            write_json_atomic(path, self.to_dict())
        except OSError as e:
            raise MlxLoraError(
                f"cannot write {path} ({write_error_detail(e)}); make the folder writable or free "
                "disk space"
            ) from None
        return path

    @classmethod
    def read(cls, out_dir: Path) -> Manifest:
        """``out_dir/export.json``; missing or malformed: a one-line :class:`MlxLoraError`."""
        out = Path(out_dir)
        path = out / MANIFEST
        if not path.is_file():
            raise MlxLoraError(
                f"{out} has no {MANIFEST}: pass a folder written by python -m mlx_lora.export"
            )
        try:
            data = read_json(path)
        except MlxLoraError as e:  # not JSON, or not an object: its finding, our way on
            what = " ".join(str(e).split()).removeprefix(f"{path}: ").split("; ")[0]
            raise MlxLoraError(f"{path}: {what}; {_REEXPORT}") from None
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.name not in _ADDED_LATER]
        if missing:
            raise MlxLoraError(
                f"{path}: not an export manifest (missing {', '.join(missing)}); {_REEXPORT}"
            )
        values = {f.name: data.get(f.name) for f in fields}  # unknown keys: a newer writer's
        bad = [k for k, v in values.items() if not _accepts(hints[k], v)]
        if bad:
            k = bad[0]
            raise MlxLoraError(
                f"{path}: {k} is {json.dumps(values[k], ensure_ascii=False)[:60]}, expected "
                f"{_describe(hints[k])}; {_REEXPORT}"
            )
        return cls(**values)

    def path(self, out_dir: Path, key: str) -> Path | None:
        """The path recorded under ``key`` (relative ones start at ``out_dir``), or None."""
        value = getattr(self, key)
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else Path(out_dir) / p


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation (``str | None``, ``list[str]``, ...)."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_accepts(item, x) for x in value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return "a list of " + {str: "strings", int: "numbers"}.get(item, str(item))
    return {str: "a string", int: "a number", dict: "an object"}.get(tp, tp.__name__)
