"""Experiment trackers (``--report-to``): TensorBoard, SwanLab, Weights & Biases, MLflow.

The seed's users come from Hugging Face's ``TrainingArguments(report_to=...)``; the same names work
here, with HF's tags (``train/loss``, ``train/learning_rate``, ``eval/loss``, ...). Each tracker is
a :class:`mlx_lora.train.report.Reporter`, so the training loop does not know about any of them.
Each is
an optional extra (``pip install "mlx_lora[tensorboard]"`` ...), imported only when asked for; a
missing package stops the run before anything is loaded, with the line to install it. A tracker
that fails while the run goes on (network, disk) is reported once and dropped: losing a chart must
not lose a fine-tune. Only rank 0 reports. A resumed run continues the same tracker run: the ids
are kept in ``OUT/trackers.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json, write_json_atomic
from mlx_lora.train.report import Reporter

TRACKERS = {  # name → (module to import, extra that installs it)
    "tensorboard": ("tensorboard", "tensorboard"),
    "swanlab": ("swanlab", "swanlab"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE_FILE = "trackers.json"


def _say(text: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _logged_in(env_key: str, *netrc_files: Path, host: str) -> bool:
    if os.environ.get(env_key):
        return True
    return any(p.is_file() and host in p.read_text(errors="replace") for p in netrc_files)


def parse_report_to(value: str | None) -> list[str]:
    """``none``, ``all`` (every installed tracker) or a comma list of :data:`TRACKERS` names."""
    names = [n.strip().lower() for n in (value or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n, (mod, _) in TRACKERS.items() if importlib.util.find_spec(mod)]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise MlxLoraError(
            f"--report-to {unknown[0]!r} is not a tracker; choose none, all or a comma list of "
            f"{', '.join(TRACKERS)}"
        )
    for n in names:
        module, extra = TRACKERS[n]
        if importlib.util.find_spec(module) is None:
            raise MlxLoraError(
                f'--report-to {n} needs the {module} package: pip install "mlx_lora[{extra}]"'
            )
    return list(dict.fromkeys(names))


def _flat(config: dict) -> dict[str, Any]:
    """Settings as trackers take them: numbers, strings and booleans; everything else as text."""
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)
    return {k: ("" if v is None else v) for k, v in out.items()}


def scalars(record: dict) -> dict[str, float]:
    """A logged record under HF's tags: ``train/loss``, ``eval/loss``, ``train/epoch``, ..."""
    evaluation = "eval_loss" in record
    out = {}
    for k, v in record.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            continue
        if evaluation:
            out[f"eval/{k.removeprefix('eval_')}" if k != "epoch" else "train/epoch"] = float(v)
        else:
            out[f"train/{k}"] = float(v)
    return out


class Tracker(Reporter):
    """A tracker: ``_open``, ``_write`` and ``_close`` in subclasses; failures are caught here."""

    name = "tracker"

    def __init__(self, out: Path, run_name: str, project: str, resume: dict | None):
        self.out, self.run_name, self.project = Path(out), run_name, project
        self.resume = resume or {}
        self.alive = True
        self.speed: dict[str, float] = {}

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        if not self.alive:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any tracker failure: warn once, train on
            self.alive = False
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            _say(
                f"warning: --report-to {self.name} failed while {what} ({detail}); training goes "
                "on without it"
            )

    def state(self) -> dict:
        """What a resumed run needs to continue this tracker's run (saved in trackers.json)."""
        return {}

    def start(self, info: dict, config: dict) -> None:
        self._guard("starting", self._open, config)

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
        self.speed = {
            "train/tokens_per_second": tokens_per_second,
            "train/peak_memory_gb": peak_memory / 1e9,
        }

    def log(self, record: dict, step: int) -> None:
        values = scalars(record)
        if "train/loss" in values:
            values.update(self.speed)
        self._guard("logging", self._write, values, step)

    def end(self, status: str, message: str, summary: dict | None = None) -> None:
        self._guard("closing", self._close, status)

    def _open(self, config: dict) -> None:
        raise NotImplementedError

    def _write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in ``OUT/runs/<run name>`` (HF's ``logging_dir``), read by TensorBoard."""

    name = "tensorboard"

    def _open(self, config: dict) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = self.out / "runs" / self.resume.get("logdir", self.run_name)
        self.writer = EventFileWriter(str(self.logdir))
        self._text("config", json.dumps(config, indent=1, ensure_ascii=False, default=str))

    def state(self) -> dict:
        return {"logdir": self.logdir.name} if hasattr(self, "logdir") else {}

    def _event(self, step: int, values: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(
            Event(wall_time=time.time(), step=step, summary=Summary(value=values))
        )

    def _text(self, tag: str, text: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype=7, string_val=[text.encode("utf-8")])  # 7 = DT_STRING
        self._event(0, [Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def _write(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(step, [Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self.writer.flush()

    def _close(self, status: str) -> None:
        self.writer.close()


class SwanLabTracker(Tracker):
    """SwanLab (popular with Chinese tutorials); ``SWANLAB_MODE`` chooses cloud/local/offline."""

    name = "swanlab"

    def _open(self, config: dict) -> None:
        import swanlab

        mode = os.environ.get("SWANLAB_MODE") or None
        home = Path.home()
        if mode is None and not _logged_in(
            "SWANLAB_API_KEY", home / ".swanlab" / ".netrc", home / ".netrc", host="swanlab"
        ):
            mode = "offline"
            where = self.out / "swanlog"
            _say(f"SwanLab: not logged in; logging offline to {where} (`swanlab sync` uploads it)")
        kw: dict[str, Any] = {"mode": mode}
        if self.resume.get("id"):
            kw.update(id=self.resume["id"], resume="allow")
        self.run = swanlab.init(
            project=self.project,
            name=self.run_name,
            config=_flat(config),
            log_dir=str(self.out / "swanlog"),
            **kw,
        )

    def state(self) -> dict:
        run_id = getattr(getattr(self, "run", None), "id", None)
        return {"id": run_id} if run_id else {}

    def _write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def _close(self, status: str) -> None:
        self.run.finish()


def _wandb_mode() -> str | None:
    """W&B's own choice when configured; offline when no API key is known (no login prompt)."""
    if os.environ.get("WANDB_MODE"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return None if _logged_in("WANDB_API_KEY", netrc, host="api.wandb.ai") else "offline"


class WandbTracker(Tracker):
    """Weights & Biases; without a login it logs offline into ``OUT/wandb`` (``wandb sync``)."""

    name = "wandb"

    def _open(self, config: dict) -> None:
        import wandb

        mode = _wandb_mode()
        if mode == "offline":
            where = self.out / "wandb"
            _say(f"W&B: not logged in; logging offline to {where} (`wandb sync` uploads it)")
        self.run = wandb.init(
            project=self.project,
            name=self.run_name,
            config=config,
            dir=str(self.out),
            mode=mode,
            id=self.resume.get("id"),
            resume="allow" if self.resume.get("id") else None,
        )

    def state(self) -> dict:
        run_id = getattr(getattr(self, "run", None), "id", None)
        return {"id": run_id} if run_id else {}

    def _write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def _close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MlflowTracker(Tracker):
    """MLflow: your ``MLFLOW_TRACKING_URI`` (a tracking server) when set; else a local file store
    in ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``), which MLflow 3 keeps in
    maintenance mode but still reads — the database stores need the full ``mlflow`` package."""

    name = "mlflow"

    def _open(self, config: dict) -> None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((self.out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(self.project)
        self.active = mlflow.start_run(run_id=self.resume.get("run_id"), run_name=self.run_name)
        if not self.resume.get("run_id"):
            flat = {k: str(v)[:500] for k, v in _flat(config).items()}
            mlflow.log_params(flat)

    def state(self) -> dict:
        active = getattr(self, "active", None)
        return {"run_id": active.info.run_id} if active is not None else {}

    def _write(self, values: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def _close(self, status: str) -> None:
        import mlflow

        mlflow.end_run("FINISHED" if status == "finished" else "KILLED")


_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "swanlab": SwanLabTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


def open_trackers(
    names: list[str], out: Path, run_name: str | None, project: str | None, resumed: bool
) -> list[Tracker]:
    """Trackers for ``names``; a resumed run continues the runs ``OUT/trackers.json`` records."""
    saved = read_json(Path(out) / STATE_FILE) if resumed else {}
    name = run_name or saved.get("run_name") or time.strftime("%b%d_%H-%M-%S")
    project = project or saved.get("project") or "mlx_lora"
    return [_CLASSES[n](out, name, project, saved.get(n)) for n in names]


def save_tracker_state(out: Path, trackers: list[Tracker]) -> None:
    """Remember run name, project and each tracker's run id, so ``--resume`` continues them."""
    if not trackers:
        return
    state: dict[str, Any] = {"run_name": trackers[0].run_name, "project": trackers[0].project}
    state.update({t.name: t.state() for t in trackers})
    write_json_atomic(Path(out) / STATE_FILE, state)
