"""``python -m mlx_lora.train``: LoRA fine-tuning with real checkpoints.

Stages: resolve the model (hub) → load and wrap it (model, lora) → encode the data (data) → loop
(this file) → adapter folder in the PEFT format. Every file is written atomically; a run can be
resumed from its last complete checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_lora.config import TrainConfig, parse_config
from mlx_lora.data import Batch, Dataset, epoch_order, load_dataset, make_batch, split
from mlx_lora.errors import MlxLoraError
from mlx_lora.files import atomic_dir, write_error_detail, write_json_atomic
from mlx_lora.hub import resolve_model
from mlx_lora.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    apply_lora,
    lora_state,
    normalize_targets,
    save_adapter,
)
from mlx_lora.loss import loss_sum
from mlx_lora.model import TRAINABLE_TYPES, compute_dtype, device_name, load_base

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    best_model_checkpoint: str | None
    tokens_per_second: float
    peak_memory_gb: float
    stopped_early: bool = False


def validate(cfg: TrainConfig) -> None:
    """Reject impossible numbers before anything is loaded."""
    checks = [
        (cfg.learning_rate > 0, f"--learning-rate must be > 0, got {cfg.learning_rate}"),
        (
            cfg.per_device_train_batch_size > 0,
            f"--per-device-train-batch-size must be > 0, got {cfg.per_device_train_batch_size}",
        ),
        (
            cfg.gradient_accumulation_steps > 0,
            f"--gradient-accumulation-steps must be > 0, got {cfg.gradient_accumulation_steps}",
        ),
        (
            cfg.max_steps > 0 or cfg.num_train_epochs > 0,
            f"--num-train-epochs must be > 0 (or set --max-steps), got {cfg.num_train_epochs}",
        ),
        (cfg.max_seq_length >= 2, f"--max-seq-length must be at least 2, got {cfg.max_seq_length}"),
        (cfg.logging_steps > 0, f"--logging-steps must be > 0, got {cfg.logging_steps}"),
        (cfg.save_steps > 0, f"--save-steps must be > 0, got {cfg.save_steps}"),
        (
            cfg.eval_steps is None or cfg.eval_steps > 0,
            f"--eval-steps must be > 0, got {cfg.eval_steps}",
        ),
        (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.lora_r > 0, f"--lora-r must be > 0, got {cfg.lora_r}"),
        (cfg.lora_alpha > 0, f"--lora-alpha must be > 0, got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {cfg.max_grad_norm}"),
        (
            cfg.save_total_limit is None or cfg.save_total_limit > 0,
            f"--save-total-limit must be > 0, got {cfg.save_total_limit}",
        ),
        (
            cfg.early_stopping_patience is None or cfg.val_split > 0 or cfg.eval_data,
            "--early-stopping-patience needs validation data: set --val-split (e.g. 0.05) or "
            "--eval-data",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise MlxLoraError(msg)


# ---------------------------------------------------------------- output folder and checkpoints


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so never partial), oldest first."""
    found = []
    for p in out.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if (
            p.is_dir()
            and step.isdigit()
            and all(
                (p / f).is_file()
                for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE, STATE_FILE)
            )
        ):
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def prepare_output_dir(out: Path, cfg: TrainConfig) -> Path | None:
    """Check the folder is ours to write; returns the checkpoint to resume from, if any."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(cfg)}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MlxLoraError(
            f"cannot write to --output-dir {out} ({e.strerror}); choose a writable folder"
        ) from None
    for stale in out.glob(".checkpoint-*"):  # temp folders of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    existing = checkpoints(out)
    finished = (out / ADAPTER_WEIGHTS).is_file()
    if cfg.resume:
        if cfg.resume != "latest":
            ckpt = Path(cfg.resume)
            if not (
                ckpt.is_dir()
                and ckpt in {c.resolve() for c in existing} | {ckpt}
                and (ckpt / OPTIMIZER_FILE).is_file()
            ):
                raise MlxLoraError(
                    f"--resume {ckpt}: not a complete checkpoint folder (needs {OPTIMIZER_FILE} "
                    f"and {STATE_FILE})"
                )
            return ckpt
        if not existing:
            raise MlxLoraError(f"--resume: no complete checkpoint in {out}; start without --resume")
        return existing[-1]
    if finished or existing:
        if not cfg.overwrite_output_dir:
            what = "a finished run" if finished else f"an unfinished run ({existing[-1].name})"
            hint = "" if finished else "--resume to continue it, or "
            raise MlxLoraError(
                f"{out} holds {what}; pass {hint}--overwrite-output-dir to start over, or choose "
                "another --output-dir"
            )
        for p in existing:
            shutil.rmtree(p)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_FILE, "loss.png"):
            (out / name).unlink(missing_ok=True)
    return None


def _resume_point(out: Path, cfg: TrainConfig) -> Path | None:
    """What rank 0's :func:`prepare_output_dir` chose, computed read-only on the other ranks."""
    if not cfg.resume:
        return None
    if cfg.resume != "latest":
        return Path(cfg.resume)
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(
    out: Path, model: nn.Module, optimizer: optim.Optimizer, state: TrainerState, adapter_cfg: dict
) -> Path:
    """``checkpoint-<step>``: adapter + optimizer + trainer state, built aside then renamed in."""
    final = out / f"checkpoint-{state.global_step}"
    try:
        with atomic_dir(final) as tmp:
            save_adapter(tmp, model, adapter_cfg)
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
            write_json_atomic(tmp / STATE_FILE, asdict(state))
    except (OSError, RuntimeError) as e:
        raise MlxLoraError(
            f"cannot write checkpoint {final} ({write_error_detail(e)}); free disk space and "
            "--resume"
        ) from None
    return final


def prune_checkpoints(out: Path, limit: int | None, keep: str | None) -> None:
    if not limit:
        return
    ckpts = checkpoints(out)
    removable = [p for p in ckpts if str(p) != keep]
    for p in removable[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(p, ignore_errors=True)


def restore(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainerState:
    """Adapter weights, optimizer moments and counters of a checkpoint."""
    from mlx_lora.lora import set_lora_tensors

    try:
        tensors = mx.load(str(ckpt / ADAPTER_WEIGHTS))
        opt_state = mx.load(str(ckpt / OPTIMIZER_FILE))
        raw = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - damaged files are a user-level problem
        raise MlxLoraError(
            f"checkpoint {ckpt} is damaged ({e}); delete it to resume from an older one"
        ) from None
    expected = lora_state(model)
    if set(tensors) != set(expected) or any(
        tensors[k].shape != expected[k].shape for k in expected
    ):
        raise MlxLoraError(
            f"checkpoint {ckpt} was made with other LoRA settings (rank/targets); resume with the "
            "same flags"
        )
    set_lora_tensors(model, tensors)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    mx.eval(optimizer.state)
    return TrainerState(**raw)


# ---------------------------------------------------------------- schedule, batches, steps


def make_schedule(cfg: TrainConfig, total_steps: int):
    """HF semantics: linear warmup from 0, then linear/cosine decay to 0 at the last step, or constant."""
    lr, warm = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    decay_steps = max(1, total_steps - warm)
    if cfg.lr_scheduler_type == "constant":
        after = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731
    elif cfg.lr_scheduler_type == "cosine":
        after = optim.cosine_decay(lr, decay_steps, 0.0)
    else:
        after = optim.linear_schedule(lr, 0.0, decay_steps)
    if warm == 0:
        return after
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warm), after], [warm])


def step_examples(
    step: int, n_train: int, per_step: int, steps_per_epoch: int, seed: int
) -> np.ndarray:
    """Example indices of optimizer step ``step``: a pure function, so resume sees the same data."""
    epoch, pos = divmod(step, steps_per_epoch)
    return epoch_order(n_train, seed, epoch)[pos * per_step : (pos + 1) * per_step]


def rank_share(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's slice of a step's examples (contiguous; may be empty at an epoch's end)."""
    per_rank = -(-len(ids) // world)
    return ids[rank * per_rank : (rank + 1) * per_rank]


def batch_arrays(b: Batch) -> tuple[mx.array, ...]:
    return (
        mx.array(b.inputs),
        mx.array(b.segments),
        mx.array(b.targets),
        mx.array(b.labels),
        mx.array(b.weights),
    )


def all_sum(x: float, group: mx.distributed.Group | None) -> float:
    if group is None or group.size() == 1:
        return x
    return mx.distributed.all_sum(mx.array(x, dtype=mx.float32), group=group, stream=mx.cpu).item()


def evaluate(
    model: nn.Module,
    examples: list,
    batch_size: int,
    max_len: int,
    packing: bool,
    pad_id: int,
    group: mx.distributed.Group | None = None,
) -> float:
    """Mean token cross-entropy over the validation examples (same packing as training, sharded by rank)."""
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    model.eval()
    total, count = 0.0, 0
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        b = make_batch(mine[i : i + batch_size], max_len, packing, pad_id)
        loss = loss_sum(model, *batch_arrays(b))
        total += loss.item()
        count += b.n_target_tokens
    model.train()
    return all_sum(total, group) / max(all_sum(float(count), group), 1.0)


def plot_losses(history: list[dict], path: Path) -> None:
    """``loss.png``: the curve the seed's users otherwise read off log lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _fmt(record: dict) -> str:
    """The seed's log line: a Python dict with rounded floats."""
    return str({k: (round(v, 4) if k in ("loss", "eval_loss") else v) for k, v in record.items()})


# ---------------------------------------------------------------- the run


def summary(
    cfg: TrainConfig,
    ds: Dataset,
    n_train: int,
    n_val: int,
    trainable: int,
    total: int,
    steps_per_epoch: int,
    total_steps: int,
    dtype: mx.Dtype,
    world: int = 1,
) -> str:
    eff = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    procs = f" × {world} processes" if world > 1 else ""
    skipped = f", {ds.skipped} skipped (missing/empty fields)" if ds.skipped else ""
    trunc = f", {ds.truncated} truncated to {cfg.max_seq_length} tokens" if ds.truncated else ""
    dropped = (
        f", {ds.dropped_no_target} dropped (no answer left after truncation)"
        if ds.dropped_no_target
        else ""
    )
    quant = f", base quantized to {cfg.quantize} bits" if cfg.quantize else ""
    return (
        f"data: {ds.records} records ({ds.format}) → {len(ds.examples)} examples "
        f"kept{skipped}{trunc}{dropped}; "
        f"{n_train} train / {n_val} validation; {ds.tokens:,} tokens, {ds.target_tokens:,} "
        "trained on\n"
        f"model: {trainable:,} trainable LoRA parameters of {total:,} "
        f"({100 * trainable / max(total, 1):.3f}%); "
        f"device {device_name()}, dtype {str(dtype).split('.')[-1]}{quant}\n"
        f"schedule: {steps_per_epoch} steps/epoch, {total_steps} steps, effective batch {eff} "
        f"({cfg.per_device_train_batch_size} × {cfg.gradient_accumulation_steps} "
        f"accumulation{procs}), "
        f"packing {'on' if cfg.packing else 'off'}, gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}"
    )


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run one training job end to end; what the CLI calls and what tests call directly."""
    from tqdm import tqdm

    validate(cfg)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    lead = rank == 0  # only rank 0 prints and writes; every rank computes
    say = print if lead else (lambda *a, **k: None)
    out = Path(cfg.output_dir)
    resume_from = prepare_output_dir(out, cfg) if lead else (_resume_point(out, cfg))
    model_dir = resolve_model(cfg.model, cfg.model_source)
    dtype = compute_dtype(cfg.dtype)
    model, tokenizer, config = load_base(model_dir, dtype=dtype, quantize=cfg.quantize)
    if config.get("model_type") not in TRAINABLE_TYPES:
        raise MlxLoraError(
            f"training {config.get('model_type')!r} models is not supported; supported: "
            f"{', '.join(TRAINABLE_TYPES)}"
        )

    ds = load_dataset(
        Path(cfg.data),
        tokenizer,
        fmt=cfg.format,
        system_prompt=cfg.system_prompt,
        max_seq_length=cfg.max_seq_length,
    )
    if cfg.eval_data:
        train_ex = ds.examples
        val_ex = load_dataset(
            Path(cfg.eval_data),
            tokenizer,
            fmt=cfg.format,
            system_prompt=cfg.system_prompt,
            max_seq_length=cfg.max_seq_length,
        ).examples
    else:
        train_idx, val_idx = split(len(ds.examples), cfg.val_split, cfg.seed)
        train_ex = [ds.examples[i] for i in train_idx]
        val_ex = [ds.examples[i] for i in val_idx]
    if cfg.per_device_train_batch_size * world > len(train_ex):
        raise MlxLoraError(
            f"--per-device-train-batch-size {cfg.per_device_train_batch_size} × {world} "
            f"process(es) is larger than the {len(train_ex)} training examples; lower it"
        )

    mx.random.seed(cfg.seed)
    targets = normalize_targets(cfg.target_modules)
    apply_lora(model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    model.train()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_params = sum(
        v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(("lora_A", "lora_B"))
    )
    if getattr(model.model.embed_tokens, "bits", None):  # quantized: count logical weights
        n_params = (
            sum(
                m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
                for _, m in model.named_modules()
                if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
            )
            + n_params
        )

    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    total_steps = (
        cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    )
    eval_steps = cfg.eval_steps or cfg.save_steps
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    run = {
        "train_examples": len(train_ex),
        "per_step": per_step,
        "batch": cfg.per_device_train_batch_size,
        "seed": cfg.seed,
        "packing": cfg.packing,
        "max_seq_length": cfg.max_seq_length,
    }
    extra = {
        "version": __import__("mlx_lora").__version__,
        "system_prompt": cfg.system_prompt,
        "format": ds.format,
        "quantize": cfg.quantize,
        "max_seq_length": cfg.max_seq_length,
        "base_model_dir": str(model_dir),
        "base_model_type": config.get("model_type"),
        "base_hidden_size": config.get("hidden_size"),
        "base_num_hidden_layers": config.get("num_hidden_layers"),
        "base_vocab_size": config.get("vocab_size"),
    }
    base_name = cfg.model if not Path(cfg.model).expanduser().exists() else str(model_dir)
    adapter_cfg = adapter_config(
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        targets=targets,
        base_model=base_name,
        extra=extra,
    )

    optimizer = optim.AdamW(
        learning_rate=make_schedule(cfg, total_steps), weight_decay=cfg.weight_decay
    )
    optimizer.init(model.trainable_parameters())
    state = TrainerState(
        max_steps=total_steps, num_train_epochs=total_steps / steps_per_epoch, run=run
    )
    if resume_from is not None:
        state = restore(resume_from, model, optimizer)
        changed = {k: (state.run.get(k), v) for k, v in run.items() if state.run.get(k) != v}
        if changed:
            k, (old, new) = next(iter(changed.items()))
            raise MlxLoraError(
                f"{resume_from} was trained with {k}={old}, now {new}; resume with the same data "
                "and flags"
            )
        state.max_steps = total_steps
        say(f"resuming from {resume_from} (step {state.global_step})")

    say(
        summary(
            cfg,
            ds,
            len(train_ex),
            len(val_ex),
            trainable,
            n_params,
            steps_per_epoch,
            total_steps,
            dtype,
            world,
        )
    )

    value_and_grad = nn.value_and_grad(
        model, lambda m, *a: loss_sum(m, *a, checkpoint=cfg.gradient_checkpointing)
    )
    # Compiled once per batch shape (rows and lengths are padded to multiples of 32, so shapes
    # repeat); the model and the RNG (dropout) are the state the compiled graph reads and updates.
    compiled_state = [model.state, mx.random.state]
    loss_and_grad = mx.compile(
        lambda *a: value_and_grad(model, *a), inputs=compiled_state, outputs=compiled_state
    )

    stop = {"flag": False}
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, checkpoint, exit
        stop["flag"] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    mx.reset_peak_memory()
    window_loss, window_steps, tokens_seen, t0 = 0.0, 0, 0, time.perf_counter()
    targets_seen = 0
    train_time, step_time, steps_run, stopped_early, last_eval = 0.0, 0.0, 0, False, None
    existing = checkpoints(out)
    last_good = existing[-1] if existing else None
    bar = tqdm(
        total=total_steps,
        initial=state.global_step,
        unit="step",
        disable=not (progress and lead),
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )
    log = bar.write if progress else say
    try:
        while state.global_step < total_steps and not stop["flag"]:
            step = state.global_step
            t_step = time.perf_counter()
            ids = rank_share(
                step_examples(step, len(train_ex), per_step, steps_per_epoch, cfg.seed), rank, world
            )
            micro = [
                make_batch(
                    [train_ex[j] for j in ids[i : i + cfg.per_device_train_batch_size]],
                    cfg.max_seq_length,
                    cfg.packing,
                    pad_id,
                )
                for i in range(0, len(ids), cfg.per_device_train_batch_size)
            ]
            n_targets = all_sum(float(sum(b.n_target_tokens for b in micro)), group)
            mx.random.seed(
                (cfg.seed * 1_000_003 + step) * 1_009 + rank
            )  # dropout masks depend on step and rank only
            grads, loss_total = None, 0.0
            for b in micro:
                loss, g = loss_and_grad(*batch_arrays(b))
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, grads)
                loss_total += loss.item()
                tokens_seen += b.n_tokens
                targets_seen += b.n_target_tokens
            if grads is None:  # an empty share at an epoch's end still joins the all-reduce
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            if world > 1:  # sum over ranks = the gradient of the whole global batch
                grads = tree_map(lambda g: g * world, nn.average_gradients(grads, group=group))
                loss_total = all_sum(loss_total, group)
            inv = 1.0 / max(n_targets, 1)
            grads = tree_map(lambda x: x * inv, grads)  # noqa: B023 - applied right here
            if cfg.max_grad_norm > 0:
                grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            else:
                grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
            step_loss = loss_total / max(n_targets, 1)
            if not math.isfinite(step_loss) or not math.isfinite(grad_norm.item()):
                where = (
                    f"the last good checkpoint is {last_good}"
                    if last_good
                    else "no checkpoint was saved yet"
                )
                raise MlxLoraError(
                    f"loss became {step_loss} at step {step + 1}; training stopped, {where}; "
                    "lower --learning-rate and --resume"
                )
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            step_time += (
                time.perf_counter() - t_step
            )  # compute only: no eval, no checkpoint writing
            steps_run += 1
            state.global_step = step + 1
            state.epoch = state.global_step / steps_per_epoch
            window_loss += step_loss
            window_steps += 1
            bar.set_postfix(
                loss=f"{step_loss:.4f}",
                tok_s=f"{tokens_seen / max(step_time, 1e-9):,.0f}",
                mem=human_bytes(mx.get_peak_memory()),
                refresh=False,
            )
            bar.update(1)

            if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                record = {
                    "loss": window_loss / window_steps,
                    "grad_norm": grad_norm.item(),
                    "learning_rate": float(f"{optimizer.learning_rate.item():.6g}")
                    if state.global_step < total_steps
                    else 0.0,
                    "epoch": round(state.epoch, 4),
                }
                log(_fmt(record))
                state.log_history.append({**record, "step": state.global_step})
                window_loss, window_steps = 0.0, 0
            evaluate_now = val_ex and (
                state.global_step % eval_steps == 0 or state.global_step == total_steps
            )
            if evaluate_now:
                last_eval = evaluate(
                    model,
                    val_ex,
                    cfg.per_device_train_batch_size,
                    cfg.max_seq_length,
                    cfg.packing,
                    pad_id,
                    group,
                )
                record = {"eval_loss": last_eval, "epoch": round(state.epoch, 4)}
                log(_fmt(record))
                state.log_history.append({**record, "step": state.global_step})
            save_now = state.global_step % cfg.save_steps == 0 or (
                evaluate_now
                and state.global_step % cfg.save_steps != 0
                and cfg.early_stopping_patience
            )
            improved = evaluate_now and (state.best_metric is None or last_eval < state.best_metric)
            if evaluate_now:
                state.evals_without_improvement = (
                    0 if improved else state.evals_without_improvement + 1
                )
            if save_now or stop["flag"] or (improved and cfg.early_stopping_patience):
                path = out / f"checkpoint-{state.global_step}"
                if improved:
                    state.best_metric, state.best_model_checkpoint = last_eval, str(path)
                if lead:
                    last_good = save_checkpoint(out, model, optimizer, state, adapter_cfg)
                    prune_checkpoints(out, cfg.save_total_limit, state.best_model_checkpoint)
            elif improved:
                state.best_metric, state.best_model_checkpoint = last_eval, None
            if (
                cfg.early_stopping_patience
                and state.evals_without_improvement >= cfg.early_stopping_patience
            ):
                stopped_early = True
                log(
                    "early stopping: eval_loss has not improved for "
                    f"{cfg.early_stopping_patience} evaluations"
                )
                break
        train_time = time.perf_counter() - t0
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)

    if stop["flag"]:  # the CLI prints this one line and exits 130
        raise KeyboardInterrupt(f"interrupted: saved {last_good}; continue with --resume")
    tps = tokens_seen / max(step_time, 1e-9)
    peak = mx.get_peak_memory() / 1e9
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_loss = float(np.mean(losses)) if losses else float("nan")
    result = TrainResult(
        out,
        state.global_step,
        train_loss,
        last_eval,
        state.best_model_checkpoint,
        tps,
        peak,
        stopped_early,
    )
    if not lead:
        return result
    # The final adapter: the best checkpoint when early stopping chose one (HF's load_best_model_at_end).
    best = state.best_model_checkpoint
    try:
        if stopped_early and best and Path(best).is_dir():
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                shutil.copyfile(Path(best) / name, out / f".{name}.tmp")
                (out / f".{name}.tmp").replace(out / name)
        else:
            save_adapter(out, model, adapter_cfg)
    except (OSError, RuntimeError) as e:  # MLX reports a full disk as RuntimeError
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (out / f".{name}.tmp").unlink(missing_ok=True)
            (out / name).unlink(missing_ok=True)  # no adapter_config.json without its weights
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        then = f"--resume (from {last_good})" if last_good else "run again"
        raise MlxLoraError(
            f"cannot write the adapter to {out} ({detail}); free disk space and {then}"
        ) from None
    final = {
        "train_runtime": round(train_time, 4),
        "train_samples_per_second": round(steps_run * per_step / max(train_time, 1e-9), 3),
        "train_steps_per_second": round(steps_run / max(train_time, 1e-9), 3),
        "train_loss": train_loss,
        "epoch": round(state.epoch, 4),
    }
    print(str(final))
    state.log_history.append(
        {
            **final,
            "step": state.global_step,
            "train_tokens_per_second": round(tps, 2),
            "train_tokens": tokens_seen,
            "train_target_tokens": targets_seen,
            "peak_memory_gb": round(peak, 4),
        }
    )
    try:
        write_json_atomic(out / STATE_FILE, asdict(state))
        if cfg.plot:
            plot_losses(state.log_history, out / "loss.png")
    except (OSError, RuntimeError) as e:
        (out / ".loss.png.tmp.png").unlink(missing_ok=True)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MlxLoraError(
            f"the adapter is saved in {out}, but {STATE_FILE} or loss.png could not be written "
            f"({detail}); free disk space"
        ) from None
    print(f"adapter saved to {out} ({tps:,.0f} tokens/s, peak memory {human_bytes(peak * 1e9)})")
    return result


DESCRIPTION = """LoRA fine-tuning of a chat model on Apple MLX (the seed's train.py, without its traps).

The defaults are the seed's: Qwen1.5-4B-Chat from ModelScope, dataset/huanhuan.json, batch 4 × 4
accumulation, lr 1e-4, r 8, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down. Conversations are rendered
with the model's own chat template; the loss covers every assistant turn and its end-of-turn token."""

EPILOG = """examples:
  python -m mlx_lora.train --data dataset/huanhuan.json --output-dir output/huanhuan
  python -m mlx_lora.train --model runs/tiny-qwen --data my.jsonl --max-steps 30 --val-split 0.05
  python -m mlx_lora.train --config train.yaml --learning-rate 2e-4      # flags override the file
  python -m mlx_lora.train --output-dir output/huanhuan --resume          # continue after a stop

output: adapter_config.json + adapter_model.safetensors (PEFT format), checkpoint-N/, trainer_state.json, loss.png"""


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = parse_config(TrainConfig, argv, "python -m mlx_lora.train", DESCRIPTION, EPILOG)
    return train(cfg)


if __name__ == "__main__":
    from mlx_lora.cli import run

    sys.exit(run(main))
