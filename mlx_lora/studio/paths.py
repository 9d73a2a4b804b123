"""The folders the studio may touch, and what is in them.

Every path that comes from the browser goes through :meth:`Roots.resolve`: it is made absolute
(relative paths start at the first ``--root``), symlinks are resolved, and anything that ends up
outside every root is refused. The page can therefore never read or write ``/etc/passwd``,
``../../secret`` or a symlink that points out of the tree. A model is such a path, a hub id
or an Ollama name (:meth:`Roots.model`); an ``org/name`` hub id is never looked up in the
studio's working directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.weights import INDEX_FILE
from mlx_lora.eval.compare import EVAL_JSON
from mlx_lora.export.pipeline import MODELFILE
from mlx_lora.model.gguf_import import OLLAMA_PREFIX
from mlx_lora.model.hub import fetch_hub_model
from mlx_lora.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.meta import FUSED_INFO, GENERATION_CONFIG
from mlx_lora.studio.fields import kind
from mlx_lora.train.checkpoint import CHECKPOINT_PREFIX, STATE_FILE
from mlx_lora.verify.manifest import MANIFEST

# Folders a scan never enters: environments, VCS data, caches.
SKIP_DIRS = {"node_modules", "__pycache__", "site-packages", "venv", "env"}
# JSON files that belong to models, runs and exports, not datasets.
NOT_DATA = {
    "config.json",
    GENERATION_CONFIG,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    STATE_FILE,
    ADAPTER_CONFIG,
    MANIFEST,
    FUSED_INFO,
    INDEX_FILE,
    EVAL_JSON,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
_OLLAMA = re.compile(r"ollama:[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*){0,2}(:[\w.-]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class OutsideRoot(MlxLoraError):
    """A path from the browser that leads out of the folders named with ``--root``."""


@dataclass
class Roots:
    """The ``--root`` folders (absolute, symlinks resolved); relative paths start at the first."""

    dirs: list[Path]

    @classmethod
    def parse(cls, spec: str) -> Roots:
        """``--root DIR[:DIR...]`` (``os.pathsep``-separated, like PYTHONPATH)."""
        dirs = []
        for part in (p for p in spec.split(os.pathsep) if p.strip()):
            d = Path(part).expanduser().resolve()
            if not d.is_dir():
                raise MlxLoraError(f"--root {part}: not a folder; pass an existing folder")
            dirs.append(d)
        if not dirs:
            raise MlxLoraError("--root is empty; pass a folder (default: the current folder)")
        return cls(dirs)

    def contains(self, path: Path) -> bool:
        return any(path == d or path.is_relative_to(d) for d in self.dirs)

    def resolve(self, raw: Any, *, what: str = "path", must_exist: bool = False) -> Path:
        """The absolute path ``raw`` names, if it stays inside a root; else :class:`OutsideRoot`."""
        raw = _path_text(raw, what)
        p = Path(raw)
        try:
            p = (p if p.is_absolute() else self.dirs[0] / p).resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop
            raise MlxLoraError(f"{what} {raw[:200]!r} cannot be followed ({e})") from None
        if not self.contains(p):
            raise OutsideRoot(
                f"{what} {raw[:200]!r} is outside the studio's folders ({self.describe()}); "
                "restart the studio with --root to allow another folder"
            )
        if must_exist and not p.exists():
            raise MlxLoraError(f"{what} {self.show(p)} does not exist")
        return p

    def model(self, raw: Any) -> str:
        """A model from the page as the commands get it: an absolute path inside a root, a hub
        id, or ``ollama:NAME[:TAG]``.

        The rule, in order. ``ollama:NAME[:TAG]`` names a model in Ollama's own store (no ``..``,
        no leading ``/``). A name that exists under the first root, an absolute path, a ``.gguf``
        file and anything that is not spelled ``org/name`` is a path: inside a root, existing.
        What is left, ``org/name`` with nothing of that name under the first root, is a hub id:
        fetched into the hub's cache, never read as a folder of the studio's working directory
        (commands run in the first root; the studio's own loading goes through
        :func:`mlx_lora.model.hub.fetch_hub_model`, see :func:`loadable`).
        """
        if raw is not None and not isinstance(raw, str):
            raise MlxLoraError(f"model: expected a folder, file or hub id (text), got {kind(raw)}")
        if not (raw or "").strip():
            raise MlxLoraError("model: empty; pick a model folder, a .gguf file or a hub id")
        raw = _path_text(raw, "model")
        if raw.startswith(OLLAMA_PREFIX):
            if not _OLLAMA.fullmatch(raw) or ".." in raw:
                raise MlxLoraError(f"model {raw[:80]!r}: not an Ollama name like ollama:qwen2:0.5b")
            return raw
        hub_id = _HUB_ID.fullmatch(raw) and ".." not in raw and not raw.lower().endswith(".gguf")
        if hub_id and not (self.dirs[0] / raw).exists():
            return raw
        return str(self.resolve(raw, what="model", must_exist=True))

    def show(self, path: Path) -> str:
        """``path`` as the page shows it: relative to the first root holding it."""
        for d in self.dirs:
            if path == d:
                return "." if d == self.dirs[0] else str(d)
            if path.is_relative_to(d):
                rel = path.relative_to(d)
                return str(rel) if d == self.dirs[0] else str(d / rel)
        return str(path)

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.dirs)


def _path_text(raw: Any, what: str) -> str:
    """``raw`` stripped, if it can name a file at all: text without control characters (NUL,
    newline: no file name needs them), at most 4096 bytes and 255 per part."""
    if not isinstance(raw, str):
        raise MlxLoraError(f"{what}: expected a path (text), got {kind(raw)}")
    if not raw.strip() or _CONTROL.search(raw):
        raise MlxLoraError(f"{what}: empty, or holds control characters; enter a path")
    raw = raw.strip()
    if len(raw.encode("utf-8", "replace")) > 4096 or any(
        len(x.encode("utf-8", "replace")) > 255 for x in Path(raw).parts
    ):
        raise MlxLoraError(f"{what}: the path is too long (255 bytes per name, 4096 in all)")
    return raw


def loadable(model: str) -> str:
    """:meth:`Roots.model`'s answer for loading in the studio's own process (preview, chat): a
    hub id becomes its cached folder, so an ``org/name`` folder in the working directory is never
    read in its place."""
    if model.startswith(OLLAMA_PREFIX) or Path(model).is_absolute():
        return model
    return str(fetch_hub_model(model))


@dataclass
class Found:
    """What a scan of the roots found, as the page shows the paths."""

    models: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # training output folders
    adapters: list[str] = field(default_factory=list)  # runs with a final adapter, checkpoints
    exports: list[str] = field(default_factory=list)


def _kind(d: Path, names: set[str]) -> str | None:
    if STATE_FILE in names or any(
        n.startswith(CHECKPOINT_PREFIX) and (d / n / STATE_FILE).is_file() for n in names
    ):
        return "run"
    if ADAPTER_CONFIG in names:
        return "adapter"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return "model"
    if MODELFILE in names:
        return "export"
    return None


def scan(roots: Roots, max_depth: int = 4, limit: int = 400) -> Found:
    """Models, datasets, runs and exports under the roots (shallow, hidden folders skipped)."""
    found = Found()
    for root in roots.dirs:
        for top, dirs, files in os.walk(root):
            d = Path(top)
            depth = len(d.relative_to(root).parts)
            names = set(dirs) | set(files)
            kind = _kind(d, names)
            dirs[:] = sorted(
                x
                for x in dirs
                if not x.startswith(".") and x not in SKIP_DIRS and depth < max_depth
            )
            shown = roots.show(d)
            if kind == "run":
                found.runs.append(shown)
                if ADAPTER_WEIGHTS in names:
                    found.adapters.append(shown)
                step = len(CHECKPOINT_PREFIX)  # checkpoint-<step>
                ckpts = [x for x in names if x.startswith(CHECKPOINT_PREFIX) and x[step:].isdigit()]
                found.adapters += [
                    roots.show(d / x) for x in sorted(ckpts, key=lambda x: int(x[step:]))
                ]
                dirs[:] = []
            elif kind == "adapter":
                found.adapters.append(shown)
                dirs[:] = []
            elif kind == "model":
                found.models.append(shown)
                dirs[:] = []
            elif kind == "export":
                found.exports.append(shown)
            for f in sorted(files):
                if f.endswith(".gguf") and not f.endswith("-lora.gguf"):
                    found.models.append(roots.show(d / f))
                elif f.endswith((".json", ".jsonl")) and f not in NOT_DATA and kind is None:
                    found.data.append(roots.show(d / f))
            if sum(map(len, vars(found).values())) > limit:
                return found
    return found
