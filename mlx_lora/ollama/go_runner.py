"""Ollama's own template engine, run for real: Go ``text/template`` through a small Go program.

A Modelfile TEMPLATE is Go, and Go's ``text/template`` is the only faithful judge of what Ollama
makes of it (whitespace trimming ``{{-``, ``missingkey=zero``, ``and``/``slice`` semantics). The
program in ``mlx_lora/ollama/go/render_template`` (standard library only) executes a TEMPLATE the
way
Ollama's server does (SYSTEM handling, same-role merging, think variables, legacy ``.Prompt``
templates) and reads Modelfiles with Ollama's quoting rules. It is built on first use into a cache
folder keyed by its source, so only the first call pays for ``go build`` (seconds). Go is optional
for users: :func:`go_missing` says why the check cannot run, and verify reports it as skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_file

GO_SOURCE = Path(__file__).resolve().parent / "go" / "render_template"
INSTALL_HINT = "install Go (Debian/Ubuntu: apt-get install golang-go; else https://go.dev/dl)"


def go_missing() -> str | None:
    """Why Go templates cannot be executed here (``None`` when they can)."""
    if shutil.which("go") is None:
        return f"`go` is not on PATH; {INSTALL_HINT}"
    if not (GO_SOURCE / "main.go").is_file():
        return f"the Go source {GO_SOURCE} is missing from the installation; reinstall mlx_lora"
    return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx_lora" / "go"


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(GO_SOURCE.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def build(out_dir: Path | None = None) -> Path:
    """The renderer executable, built once per source version (``out_dir`` overrides the cache)."""
    reason = go_missing()
    if reason:
        raise MlxLoraError(f"cannot run Ollama templates: {reason}")
    folder = Path(out_dir) if out_dir is not None else _cache_root() / _source_digest()
    exe = folder / "render_template"
    if exe.is_file():
        return exe
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "-mod=mod",
        "CGO_ENABLED": "0",
    }
    env.setdefault("GOCACHE", str(folder / "gocache"))
    if "HOME" not in os.environ:
        env["GOPATH"] = str(folder / "gopath")
    with atomic_file(exe) as tmp:  # a concurrent build never sees half an executable
        proc = subprocess.run(
            [shutil.which("go") or "go", "build", "-o", str(tmp), "."],
            cwd=GO_SOURCE,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MlxLoraError(f"`go build` of {GO_SOURCE} failed: {tail[0]}; check the Go install")
    return exe


class GoRenderer:
    """Runs the renderer executable; every call takes a batch (one process per batch)."""

    def __init__(self, exe: Path | None = None) -> None:
        self.exe = Path(exe) if exe is not None else build()

    def _run(self, mode: str, payload: list) -> list:
        proc = subprocess.run(
            [str(self.exe), mode],
            input=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise MlxLoraError(f"the Go template renderer failed ({err}); report this as a bug")
        return json.loads(proc.stdout.decode("utf-8"))

    def render(self, cases: list[dict[str, Any]]) -> list[dict[str, str]]:
        """Prompts for ``cases`` (``template``, ``system``, ``messages``, optional ``think``):
        each result has ``prompt`` and, when Go refused the template, ``error``."""
        return self._run("render", cases)

    def parse(self, modelfiles: list[str]) -> list[dict[str, Any]]:
        """Ollama's reading of each Modelfile text: ``commands`` (name, args) or ``error``."""
        return self._run("parse", modelfiles)


def modelfile_commands(parsed: dict[str, Any]) -> dict[str, list[str]]:
    """Commands of one :meth:`GoRenderer.parse` result by name (``model``, ``template``, ...)."""
    if parsed.get("error"):
        raise MlxLoraError(f"Ollama cannot read the Modelfile: {parsed['error']}; rewrite it")
    out: dict[str, list[str]] = {}
    for c in parsed.get("commands") or []:
        out.setdefault(c["name"], []).append(c["args"])
    return out
