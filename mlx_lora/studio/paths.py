"""The folders the studio may touch, and what is in them.

Every path that comes from the browser goes through :meth:`Roots.resolve`: it is made absolute
(relative paths start at the first ``--root``), symlinks are resolved, and anything that ends up
outside every root is refused. The page can therefore never read or write ``/etc/passwd``,
``../../secret`` or a symlink that points out of the tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.weights import INDEX_FILE
from mlx_lora.eval.compare import EVAL_JSON
from mlx_lora.export.pipeline import MODELFILE
from mlx_lora.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.meta import FUSED_INFO, GENERATION_CONFIG
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
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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

    def resolve(self, raw: str, *, what: str = "path", must_exist: bool = False) -> Path:
        """The absolute path ``raw`` names, if it stays inside a root; else :class:`OutsideRoot`."""
        if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
            raise MlxLoraError(f"{what}: empty or invalid path")
        p = Path(raw.strip())
        p = (p if p.is_absolute() else self.dirs[0] / p).resolve()
        if not self.contains(p):
            raise OutsideRoot(
                f"{what} {raw!r} is outside the studio's folders ({self.describe()}); restart the "
                "studio with --root to allow another folder"
            )
        if must_exist and not p.exists():
            raise MlxLoraError(f"{what} {self.show(p)} does not exist")
        return p

    def model(self, raw: str) -> str:
        """A ``--model`` value: a path inside a root (absolute), or a hub id / ``ollama:NAME``."""
        raw = (raw or "").strip()
        if not raw:
            raise MlxLoraError("model: empty; pick a model folder, a .gguf file or a hub id")
        inside = (self.dirs[0] / raw) if not Path(raw).is_absolute() else Path(raw)
        if not inside.exists() and (raw.startswith("ollama:") or _HUB_ID.fullmatch(raw)):
            if ".." not in raw.split("/"):
                return raw  # fetched into the hub's own cache by mlx_lora.model.hub
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
