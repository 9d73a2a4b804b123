"""A training run's folder: checkpoints, the trainer state, resume, and the final adapter.

The seed's "error 3" came from merging an adapter that an interrupted run had half written. Here
every checkpoint is built in a temporary folder and renamed into place (so a folder named
``checkpoint-N`` is always complete), a finished run is never overwritten by accident, and resume
restores the adapter, the optimizer moments and the counters, so that the run ends with the same
adapter as one that was never interrupted.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import (
    atomic_dir,
    copy_file_atomic,
    read_json,
    write_error_detail,
    write_json_atomic,
)
from mlx_lora.core.weights import load_tensors, save_tensors
from mlx_lora.model.load import save_model_folder
from mlx_lora.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_fits,
    read_adapter,
    save_adapter,
    set_lora_tensors,
)

STATE_FILE = "trainer_state.json"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PLOT_FILE = "loss.png"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-<step>


@dataclass
class TrainerState:
    """What HF's ``trainer_state.json`` holds, plus the data position needed to resume exactly."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    num_train_epochs: float = 0.0
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    evals_without_improvement: int = 0
    log_history: list[dict] = field(default_factory=list)
    run: dict = field(default_factory=dict)  # settings a resume must not change


class AdapterSaver:
    """What a LoRA/DoRA run saves: the PEFT adapter (``adapter_config.json`` + weights)."""

    files = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)

    def __init__(self, adapter_cfg: dict):
        self.adapter_cfg = adapter_cfg

    def save(self, folder: Path, model: nn.Module) -> None:
        save_adapter(folder, model, self.adapter_cfg)

    def load(self, folder: Path, model: nn.Module) -> None:
        adapter = read_adapter(folder)
        check_fits(model, adapter.tensors, f"checkpoint {folder}", adapter.base_model)
        set_lora_tensors(model, adapter.tensors)


class ModelSaver:
    """What a full fine-tune saves: a Hugging Face folder (weights, config, tokenizer, and the
    training record ``mlx_lora.json``) that chat, serve, eval and export open with --model."""

    files = (MODEL_WEIGHTS, "config.json")

    def __init__(self, base_dir: Path, info: dict):
        self.base_dir, self.info = Path(base_dir), info

    def save(self, folder: Path, model: nn.Module) -> None:

        save_model_folder(folder, model, self.base_dir, self.info)

    def load(self, folder: Path, model: nn.Module) -> None:
        weights = load_tensors(folder / MODEL_WEIGHTS)
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())


Saver = AdapterSaver | ModelSaver


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so never partial), oldest first."""
    found = []
    for p in Path(out).glob(f"{CHECKPOINT_PREFIX}*"):
        step = p.name.removeprefix(CHECKPOINT_PREFIX)
        saved = any(all((p / f).is_file() for f in k.files) for k in (AdapterSaver, ModelSaver))
        state = (p / OPTIMIZER_FILE).is_file() and (p / STATE_FILE).is_file()
        if p.is_dir() and step.isdigit() and saved and state:
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MlxLoraError(
            f"cannot write to --output-dir {out} ({e.strerror}); choose a writable folder"
        ) from None


def _chosen_checkpoint(out: Path, resume: str, existing: list[Path]) -> Path:
    if resume != "latest":
        ckpt = Path(resume)
        known = {c.resolve() for c in existing} | {ckpt}
        if not (ckpt.is_dir() and ckpt in known and (ckpt / OPTIMIZER_FILE).is_file()):
            raise MlxLoraError(
                f"--resume {ckpt}: not a complete checkpoint folder (needs {OPTIMIZER_FILE} and "
                f"{STATE_FILE})"
            )
        return ckpt
    if not existing:
        raise MlxLoraError(f"--resume: no complete checkpoint in {out}; start without --resume")
    return existing[-1]


def prepare_output_dir(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """Check the folder is ours to write; returns the checkpoint to resume from, if any.

    ``resume`` is None, ``"latest"`` or a checkpoint folder. A finished or unfinished run is only
    replaced with ``overwrite``; temporary folders of a killed run are removed.
    """
    out = Path(out)
    _check_writable(out)
    for stale in out.glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = checkpoints(out)
    if resume:
        return _chosen_checkpoint(out, resume, existing)
    finished = (out / ADAPTER_WEIGHTS).is_file() or (out / MODEL_WEIGHTS).is_file()
    if finished or existing:
        if not overwrite:
            what = "a finished run" if finished else f"an unfinished run ({existing[-1].name})"
            hint = "" if finished else "--resume to continue it, or "
            raise MlxLoraError(
                f"{out} holds {what}; pass {hint}--overwrite-output-dir to start over, or choose "
                "another --output-dir"
            )
        for p in existing:
            shutil.rmtree(p)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_FILE, PLOT_FILE, MODEL_WEIGHTS):
            (out / name).unlink(missing_ok=True)
    return None


def resume_point(out: Path, resume: str | None) -> Path | None:
    """What rank 0's :func:`prepare_output_dir` chose, computed read-only on the other ranks."""
    if not resume:
        return None
    if resume != "latest":
        return Path(resume)
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(
    out: Path, model: nn.Module, optimizer: optim.Optimizer, state: TrainerState, saver: Saver
) -> Path:
    """``checkpoint-<step>``: adapter (or model) + optimizer + trainer state, built aside then
    renamed in."""
    final = Path(out) / f"{CHECKPOINT_PREFIX}{state.global_step}"
    try:
        with atomic_dir(final) as tmp:
            saver.save(tmp, model)
            save_tensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)), {})
            write_json_atomic(tmp / STATE_FILE, asdict(state))
    except (OSError, RuntimeError) as e:
        raise MlxLoraError(
            f"cannot write checkpoint {final} ({write_error_detail(e)}); free disk space and "
            "--resume"
        ) from None
    return final


def prune_checkpoints(out: Path, limit: int | None, keep: str | None) -> None:
    """Keep the newest ``limit`` checkpoints (``keep``, the best one, is never deleted)."""
    if not limit:
        return
    ckpts = checkpoints(out)
    removable = [p for p in ckpts if str(p) != keep]
    for p in removable[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(p, ignore_errors=True)


def restore(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer, saver: Saver) -> TrainerState:
    """Adapter (or model) weights, optimizer moments and counters of a checkpoint."""
    try:
        opt_state = load_tensors(ckpt / OPTIMIZER_FILE)
        raw = read_json(ckpt / STATE_FILE, required=True)
        saver.load(ckpt, model)
        optimizer.state = tree_unflatten(list(opt_state.items()))
        mx.eval(optimizer.state)
        return TrainerState(**raw)
    except MlxLoraError as e:
        raise MlxLoraError(f"cannot resume from {ckpt}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-level problem
        raise MlxLoraError(
            f"checkpoint {ckpt} is damaged ({e}); delete it to resume from an older one"
        ) from None


def save_final(
    out: Path, model: nn.Module, saver: Saver, best: str | None, last_good: Path | None
) -> None:
    """The run's adapter (or model) in ``out``: the best checkpoint's when early stopping chose
    one (HF's ``load_best_model_at_end``), else the model's current one."""
    try:
        if best and Path(best).is_dir():
            if isinstance(saver, ModelSaver):  # all of the best checkpoint's model folder
                saver.load(Path(best), model)
                saver.save(out, model)
            else:
                for name in saver.files:
                    copy_file_atomic(Path(best) / name, out / name)
        else:
            saver.save(out, model)
    except (OSError, RuntimeError) as e:  # MLX reports a full disk as RuntimeError
        for name in saver.files:
            (out / name).unlink(missing_ok=True)  # no adapter_config.json without its weights
        then = f"--resume (from {last_good})" if last_good else "run again"
        raise MlxLoraError(
            f"cannot write the adapter to {out} ({write_error_detail(e)}); free disk space and "
            f"{then}"
        ) from None
