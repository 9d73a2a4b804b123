"""What each page action does, as plain functions over the studio's state (no HTTP here).

Every action maps the page's fields onto the command it stands for and checks them with that
command's own parser (:func:`mlx_lora.config.parse_config`), so the page accepts exactly what the
command line accepts and reports the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx_lora
from mlx_lora.config import METHODS, TrainConfig, parse_config, validate_train
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import check_apart
from mlx_lora.data.dataset import FORMATS, detect_format
from mlx_lora.data.preference import detect_preference_format
from mlx_lora.export.pipeline import MODES, ExportConfig
from mlx_lora.model.hub import check_model_dir
from mlx_lora.model.lora import ADAPTER_WEIGHTS, read_adapter
from mlx_lora.studio.chatting import ChatModels, check_messages
from mlx_lora.studio.events import curves, final_figures, run_state
from mlx_lora.studio.fields import (
    check_numbers,
    flag,
    folder_name,
    kind,
    setting_types,
    text,
)
from mlx_lora.studio.jobs import Jobs
from mlx_lora.studio.paths import Roots, loadable, scan
from mlx_lora.studio.preview import sample_records
from mlx_lora.verify.checks import have_llama_cpp
from mlx_lora.verify.manifest import MANIFEST, Manifest

# Export settings the page offers (ollama create is shown as a command to copy, not run).
EXPORT_FIELDS = (
    "model",
    "adapter",
    "output_dir",
    "gguf_type",
    "name",
    "num_ctx",
    "mode",
    "system_prompt",
    "verify",
    "overwrite",
)


@dataclass
class Studio:
    """The state every request sees."""

    roots: Roots
    jobs: Jobs
    chat: ChatModels = field(default_factory=ChatModels)
    host: str = "127.0.0.1"
    port: int = 7860
    hosts: frozenset[str] = frozenset()  # the Host headers that name it (server.own_hosts)


def info(studio: Studio) -> dict:

    return {
        "version": mlx_lora.__version__,
        "roots": [str(d) for d in studio.roots.dirs],
        "llama_cpp": have_llama_cpp(),
        "formats": list(FORMATS),
        "methods": list(METHODS),
        "train_defaults": asdict(TrainConfig()),
        "export_defaults": {k: v for k, v in asdict(ExportConfig()).items() if k in EXPORT_FIELDS},
        "gguf_types": gguf_types(),
        "export_modes": list(MODES),
    }


def gguf_types() -> list[str]:
    """``python -m mlx_lora.export``'s ``--gguf-type`` choices: the page offers exactly these."""

    gguf_type = next(f for f in dataclasses.fields(ExportConfig) if f.name == "gguf_type")
    return list(gguf_type.metadata["choices"])


def found(studio: Studio) -> dict:
    return asdict(scan(studio.roots))


# Settings whose value becomes the name of a folder or file (tracker runs, exports).
NAMES = ("run_name", "project_name", "name")


def _flags(cls: type, body: dict, allowed: set[str]) -> list[str]:
    """``--flag=value`` for the dataclass fields in ``body`` (booleans as --x / --no-x).

    Each value is checked against its field's type first (:func:`fields.flag`), and written with
    ``=`` so that text starting with ``-`` stays a value, never another flag.
    """
    types = setting_types(cls)
    flags: list[str] = []
    for key, value in body.items():
        if key not in types or key not in allowed:
            raise MlxLoraError(f"unknown setting {key[:60]!r}")
        if key in NAMES:
            value = folder_name(value, key)
        if value is None or value == "":
            continue
        value = flag(key, value, types[key])
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        else:
            flags.append(f"{name}={value}")
    return flags


def train_flags(studio: Studio, body: dict) -> tuple[list[str], Path]:
    """The page's Train form as ``python -m mlx_lora.train`` flags, paths confined to the roots."""

    body = dict(body)
    resume = body.pop("resume", False)
    if not isinstance(resume, bool):
        raise MlxLoraError(f"resume: expected true or false, got {kind(resume)}")
    roots = studio.roots
    out = roots.resolve(body.get("output_dir") or "", what="output folder")
    body["output_dir"] = str(out)
    data = roots.resolve(body.get("data") or "", what="data file", must_exist=True)
    body["data"] = str(data)
    if body.get("eval_data"):
        body["eval_data"] = str(roots.resolve(body["eval_data"], what="eval data", must_exist=True))
    body["model"] = roots.model(body.get("model"))
    allowed = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "config"}
    flags = _flags(TrainConfig, body, allowed) + (["--resume"] if resume else [])
    cfg = parse_config(TrainConfig, flags, "python -m mlx_lora.train", "")
    check_numbers(cfg)
    validate_train(cfg)
    # a file that does not parse fails here (of one over 64 MB, its start: the run reads the rest)
    records = sample_records(data).records
    if not records:
        raise MlxLoraError(f"{data}: the dataset is empty; add records")
    if cfg.format == "auto" and cfg.method == "sft":
        detect_format(records, data)
    elif cfg.format == "auto":
        detect_preference_format(records, cfg.method, data)
    _check_model(cfg.model)
    model = Path(cfg.model) if Path(cfg.model).is_absolute() else None  # a hub id: the cache
    check_apart(out, {"--model": model, "--data": data, "--eval-data": cfg.eval_data})
    return flags, out


def _check_model(model: str) -> None:
    """A local model folder that cannot be one fails before a run is started (an absolute path:
    :meth:`Roots.model` made it so; a hub id is the run's to fetch)."""
    path = Path(model)
    if path.is_absolute() and path.is_dir():
        check_model_dir(path)


def start_train(studio: Studio, body: dict) -> dict:
    flags, out = train_flags(studio, body)
    job = studio.jobs.start("train", "mlx_lora.train", flags, out, studio.roots.show(out))
    return job.snapshot()


def resume_job(studio: Studio, body: dict) -> dict:
    """Continue a run started from this page with its own settings (``--resume``)."""
    old = studio.jobs.get(text(body, "id", ""))
    if old.kind != "train":
        raise MlxLoraError(f"{old.id} is an {old.kind}, not a training run")
    flags = [f for f in old.flags if f not in ("--overwrite-output-dir", "--resume")]
    job = studio.jobs.start("train", old.module, [*flags, "--resume"], old.output_dir, old.shown)
    return job.snapshot()


def plan(studio: Studio, body: dict) -> dict:
    """``python -m mlx_lora.plan`` with the Train form's flags; its text as the command prints."""
    flags, _ = train_flags(studio, {**body, "resume": False})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mlx_lora.plan", *flags],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=studio.roots.dirs[0],
        )
    except subprocess.TimeoutExpired:
        raise MlxLoraError("the memory plan took longer than 10 minutes; try again") from None
    return {"ok": done.returncode == 0, "text": (done.stdout + done.stderr).strip()}


def start_export(studio: Studio, body: dict) -> dict:
    """``python -m mlx_lora.export`` with the Export form's settings."""

    body = dict(body)
    roots = studio.roots
    out = roots.resolve(body.get("output_dir") or "", what="export folder")
    body["output_dir"] = str(out)
    if body.get("adapter"):
        body["adapter"] = str(roots.resolve(body["adapter"], what="adapter", must_exist=True))
    if body.get("model"):
        body["model"] = roots.model(body["model"])
    flags = _flags(ExportConfig, body, set(EXPORT_FIELDS))
    check_numbers(parse_config(ExportConfig, flags, "python -m mlx_lora.export", ""))
    job = studio.jobs.start("export", "mlx_lora.export", flags, out, studio.roots.show(out))
    return job.snapshot()


def export_result(studio: Studio, jid: str) -> dict:
    """A finished export: its verify report (``Report.to_dict()`` and the quality figures, as
    verify recorded them in the manifest), the Modelfile and the ``ollama create`` command."""

    job = studio.jobs.get(jid)
    snap = job.snapshot()
    result: dict[str, Any] = {"status": snap["status"], "message": snap["message"]}
    out = job.output_dir
    path = out / MANIFEST
    finished = snap["status"] == "finished"
    # A failed export may leave an earlier export's manifest behind: only this job's counts
    # (a second of slack for coarse file-system clocks).
    if not path.is_file() or not (finished or path.stat().st_mtime >= job.started - 1):
        return result
    m = Manifest.read(out)
    if m.verify is not None:
        result["verify"] = m.verify
        result["verify_ok"] = bool(m.verify.get("ok"))
        result["quality"] = m.quality
    if finished and m.modelfile is not None:
        modelfile = m.path(out, "modelfile")
        result["name"] = m.name
        result["modelfile_path"] = studio.roots.show(modelfile)
        result["modelfile"] = modelfile.read_text(encoding="utf-8")
        result["ollama_create"] = shlex.join(["ollama", "create", m.name, "-f", str(modelfile)])
    if finished:
        result["gguf"] = m.gguf
    return result


def runs(studio: Studio, body: dict) -> dict:
    """Curves and figures of the selected output folders, a running job's events merged in."""
    dirs = body.get("dirs") or []
    if not isinstance(dirs, list):
        raise MlxLoraError(f"dirs: expected a list of run folders, got {kind(dirs)}")
    out = []
    for raw in dirs[:12]:
        d = studio.roots.resolve(raw, what="run folder")  # a starting run may not have made it yet
        state = (run_state(d) if d.is_dir() else None) or {}
        history = list(state.get("log_history") or [])
        job = studio.jobs.latest_for(d, "train")
        entry: dict[str, Any] = {
            "dir": studio.roots.show(d),
            "global_step": state.get("global_step", 0),
            "max_steps": state.get("max_steps"),
            "figures": final_figures(history),
            "finished": (d / ADAPTER_WEIGHTS).is_file(),
        }
        if job is not None:
            snap = job.snapshot(since=10**12)
            history += snap["history"]
            entry["job"] = {k: snap[k] for k in ("id", "status", "message", "progress")}
        entry["curves"] = curves(history)
        out.append(entry)
    return {"runs": out}


def chat_target(studio: Studio, body: dict) -> tuple[str, Path | None]:
    """(model, adapter) for a chat request; ``base: true`` = the same model without the adapter.

    Without a model the adapter's recorded base is used (as ``python -m mlx_lora.chat`` does); it
    must lie inside the roots too, like any path the page reaches.
    """

    adapter = None
    if body.get("adapter"):
        adapter = studio.roots.resolve(body["adapter"], what="adapter", must_exist=True)
    return _chat_base(studio, body, adapter), None if body.get("base") else adapter


def _chat_base(studio: Studio, body: dict, adapter: Path | None) -> str:
    """The model a chat with ``adapter`` runs on: the body's ``model``, else the recorded base."""
    roots = studio.roots
    model = body.get("model") or (read_adapter(adapter).base_model if adapter else None)
    if not model:
        raise MlxLoraError(
            "pick an adapter (a training output folder) or a model to chat with"
            if adapter is None
            else f"{roots.show(adapter)} records no base model; enter the model to use"
        )
    return loadable(roots.model(model))


MAX_COMPARE = 6  # runs side by side in the Chat tab's compare mode (the base may join them)
Column = tuple[str | None, list[dict]]  # (adapter name, or None for the bare base; messages)


def compare_targets(studio: Studio, body: dict) -> tuple[str, dict[str, Path], list[Column]]:
    """(base, {name: run folder}, columns) of a compare request.

    ``columns``: ``[{"adapter": RUN, "messages": [...]}, …, {"base": true, "messages": [...]}]``,
    two or more distinct runs and at most one base column, in the order the page shows them. The
    runs must share one base (``model`` if given, else each run's recorded base, found as
    :func:`chat_target` finds it); runs of different bases are refused.
    """
    columns = body.get("columns")
    if not isinstance(columns, list) or not all(isinstance(c, dict) for c in columns):
        raise MlxLoraError(
            f"columns: expected a list of {{adapter, messages}}, got {kind(columns)}"
        )
    if not 2 <= len(columns) <= MAX_COMPARE + 1:
        raise MlxLoraError(
            f"columns: compare 2 to {MAX_COMPARE} runs (and the base), got {len(columns)}"
        )
    roots = studio.roots
    adapters: dict[str, Path] = {}
    bases: dict[str, str] = {}
    out: list[Column] = []
    for c in columns:
        if unknown := sorted(set(c) - {"adapter", "base", "messages"}):
            raise MlxLoraError(f"columns: unknown key {unknown[0][:40]!r}")
        messages = check_messages(c.get("messages"))
        if flag("base", c.get("base", False), bool):
            if c.get("adapter"):
                raise MlxLoraError("columns: a column is a run (adapter) or the base, not both")
            out.append((None, messages))
            continue
        path = roots.resolve(c.get("adapter"), what="adapter", must_exist=True)
        name = roots.show(path)
        if name in adapters:
            raise MlxLoraError(f"columns: {name} is picked twice")
        adapters[name], bases[name] = path, _chat_base(studio, body, path)
        out.append((name, messages))
    if len(adapters) < 2:
        raise MlxLoraError("compare: pick two or more runs (training output folders)")
    if sum(name is None for name, _ in out) > 1:
        raise MlxLoraError("columns: the base model is picked twice")
    first = next(iter(adapters))
    for name, base in bases.items():
        if base != bases[first]:
            raise MlxLoraError(
                f"{first} and {name} were trained on different bases ({bases[first]}, {base}); "
                "compare runs of one base"
            )
    return bases[first], adapters, out
