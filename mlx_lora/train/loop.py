"""``python -m mlx_lora.train``: LoRA fine-tuning with real checkpoints.

Stages: resolve and load the model (hub, model) → wrap it (lora) → encode the data (data) → the
loop (this file: one optimizer step, evaluation, checkpoint rules) → the adapter folder in the
PEFT format (checkpoint). Progress goes to a :class:`mlx_lora.train.report.Reporter`. Every file is
written atomically; a run can be resumed from its last complete checkpoint and ends with the same
adapter as an uninterrupted run.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lora.config import NEEDS_REFERENCE, TrainConfig, validate_train
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import check_apart, write_error_detail, write_json_atomic
from mlx_lora.core.units import human_bytes
from mlx_lora.data.dataset import (
    Batch,
    Dataset,
    Encoded,
    epoch_order,
    make_batch,
)
from mlx_lora.data.prepare import run_examples
from mlx_lora.eval.compare import EvalConfig, evaluate_adapter
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.load import compute_dtype, device_name, load_base, load_base_tokenizer
from mlx_lora.model.lora import (
    adapter_config,
    apply_lora,
    check_fits,
    lora_params_of,
    normalize_targets,
    read_adapter,
    set_lora_tensors,
)
from mlx_lora.plan.footprint import read_shape
from mlx_lora.plan.memory import check as check_memory
from mlx_lora.plan.memory import check_flags
from mlx_lora.plan.recompute import Decision
from mlx_lora.plan.recompute import decide as decide_checkpointing
from mlx_lora.train.checkpoint import (
    PLOT_FILE,
    STATE_FILE,
    AdapterSaver,
    ModelSaver,
    TrainerState,
    checkpoints,
    prepare_output_dir,
    prune_checkpoints,
    restore,
    resume_point,
    save_checkpoint,
    save_final,
)
from mlx_lora.train.forward import Layout, cpu_lanes, fast_path, keep_buffers
from mlx_lora.train.grpo import GRPOMethod, Settings
from mlx_lora.train.loss import (
    all_sum,
    batch_arrays,
    checkpoint_layers,
    evaluate,
    general_loss_sum,
    loss_sum,
    training_path,
)
from mlx_lora.train.preference import (
    DEFAULT_BETA,
    Objective,
    PreferenceMethod,
    ReferenceSwap,
)
from mlx_lora.train.report import Fanout, Reporter, default_reporter, plot_losses
from mlx_lora.train.rewards import load_rewards
from mlx_lora.train.trackers import open_trackers, parse_report_to, save_tracker_state


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
    gradient_checkpointing: bool | None = None  # what --gradient-checkpointing (auto) chose


# ---------------------------------------------------------------- schedule, batches


def make_schedule(cfg: TrainConfig, total_steps: int):
    """HF semantics: linear warmup from 0, then linear/cosine decay to 0 at the end, or constant."""
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


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    """``--optim`` with the schedule; the state of each is a tree of arrays, so it checkpoints and
    resumes the same way."""
    lr, wd = make_schedule(cfg, total_steps), cfg.weight_decay
    name = {"adamw_torch": "adamw", "adamw_hf": "adamw"}.get(cfg.optim, cfg.optim)
    if name == "adam" and wd:
        raise MlxLoraError("--optim adam has no weight decay; use --optim adamw for --weight-decay")
    if name == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=wd)
    if name == "adam":
        return optim.Adam(learning_rate=lr)
    if name == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=wd)
    if name == "adafactor":  # the schedule sets the step size, as with HF's Adafactor + scheduler
        return optim.Adafactor(
            learning_rate=lr, relative_step=False, scale_parameter=False, weight_decay=wd
        )
    if name == "muon":
        return optim.Muon(learning_rate=lr, weight_decay=wd)
    raise MlxLoraError(f"unknown --optim {cfg.optim!r}; choose adamw, adam, sgd, adafactor, muon")


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


# ---------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything one training run holds once it is set up; the loop reads and updates it."""

    cfg: TrainConfig
    out: Path
    group: Any  # mx.distributed.Group
    model: nn.Module
    tokenizer: Any
    train_ex: list[Encoded]
    val_ex: list[Encoded]
    saver: AdapterSaver | ModelSaver
    optimizer: optim.Optimizer
    state: TrainerState
    steps_per_epoch: int
    total_steps: int
    pad_id: int
    summary: str
    loss_and_grad: Callable = field(repr=False, default=None)  # type: ignore[assignment]
    trackers: list = field(default_factory=list)
    path: str = "packed"  # mlx_lora.train.loss.training_path: packed, or the model's own forward
    recompute: Decision = field(default_factory=lambda: Decision(False, "off"))
    eager: bool = (
        False  # the packed path through mlx_lora.train.forward: exact shapes, lanes, eager
    )
    lanes: int = 1
    finish_grads: Callable = field(repr=False, default=None)  # type: ignore[assignment]
    apply_update: Callable = field(repr=False, default=None)  # type: ignore[assignment]
    method: Any = None  # --method other than sft: mlx_lora.train.preference / grpo

    @property
    def packing(self) -> bool:
        return self.cfg.packing and self.path == "packed"

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def world(self) -> int:
        return self.group.size()

    @property
    def lead(self) -> bool:
        """Only rank 0 prints and writes; every rank computes."""
        return self.rank == 0

    @property
    def per_step(self) -> int:
        c = self.cfg
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world


def _wrap(cfg: TrainConfig, model: nn.Module, config: dict) -> tuple[list[int] | None, list[str]]:
    """LoRA on the target modules of every block, or of the last ``--lora-layers`` blocks;
    returns the blocks and the module names wrapped (fused ones where the model fuses)."""
    n_layers = len(model.layers)
    layers = None
    if cfg.lora_layers is not None:
        if not 0 < cfg.lora_layers <= n_layers:
            raise MlxLoraError(
                f"--lora-layers must be between 1 and the model's {n_layers} blocks, got "
                f"{cfg.lora_layers}"
            )
        layers = list(range(n_layers - cfg.lora_layers, n_layers))
    wrapped = apply_lora(
        model,
        normalize_targets(cfg.target_modules),
        cfg.lora_r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        layers=layers,
        dora=uses_dora(cfg),
    )
    return layers, list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in wrapped))


def uses_dora(cfg: TrainConfig) -> bool:
    return cfg.use_dora or cfg.finetune_type == "dora"


def _base_name(cfg: TrainConfig, model_dir: Path) -> str:
    """The base a run records: a hub id as given, a folder by its path, a GGUF file by its path
    (not its converted cache folder, which is disposable)."""
    if cfg.model.lower().endswith(".gguf"):
        return str(Path(cfg.model).expanduser().resolve())
    return cfg.model if not Path(cfg.model).expanduser().exists() else str(model_dir)


def _record(cfg: TrainConfig, ds: Dataset, model_dir: Path, config: dict) -> dict:
    """What chat, export, eval and resume need to know about this run (``mlx_lora`` section of
    ``adapter_config.json``, or ``mlx_lora.json`` of a full fine-tune)."""
    return {
        "version": __import__("mlx_lora").__version__,
        "method": cfg.method,
        "finetune_type": "dora" if uses_dora(cfg) else cfg.finetune_type,
        "system_prompt": cfg.system_prompt,
        "format": ds.format,
        "quantize": cfg.quantize,
        "max_seq_length": cfg.max_seq_length,
        "base_model": _base_name(cfg, model_dir),
        "allow_special_tokens_in_content": cfg.allow_special_tokens_in_content,
        "base_model_dir": str(model_dir),
        "base_model_type": config.get("model_type"),
        "base_hidden_size": config.get("hidden_size"),
        "base_num_hidden_layers": config.get("num_hidden_layers"),
        "base_vocab_size": config.get("vocab_size"),
        # what `python -m mlx_lora.eval` needs to rebuild the held-out split
        "data": str(Path(cfg.data).resolve()),
        "eval_data": str(Path(cfg.eval_data).resolve()) if cfg.eval_data else None,
        "val_split": cfg.val_split,
        "seed": cfg.seed,
    }


def _prepare_model(
    cfg: TrainConfig, model: nn.Module, ds: Dataset, model_dir: Path, config: dict
) -> AdapterSaver | ModelSaver:
    """Make the model trainable as ``--finetune-type`` says; returns what the run will save."""
    record = _record(cfg, ds, model_dir, config)
    if cfg.finetune_type == "full":
        model.unfreeze()
        return ModelSaver(model_dir, record)
    layers, targets = _wrap(cfg, model, config)
    return AdapterSaver(
        adapter_config(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=targets,
            base_model=record["base_model"],
            extra=record,
            layers=layers,
            dora=uses_dora(cfg),
        )
    )


def _load(cfg: TrainConfig, model_dir: Path, tokenizer: Any) -> tuple[nn.Module, dict]:
    model, _, config = load_base(
        model_dir, dtype=compute_dtype(cfg.dtype), quantize=cfg.quantize, tokenizer=tokenizer
    )
    return model, config


def _resume(run: Run, ckpt: Path) -> None:
    """Restore a checkpoint; the data order and batch layout must be those it was made with."""
    expected = run.state.run
    run.state = restore(ckpt, run.model, run.optimizer, run.saver)
    changed = {
        k: (run.state.run.get(k), v) for k, v in expected.items() if run.state.run.get(k) != v
    }
    if changed:
        k, (old, new) = next(iter(changed.items()))
        raise MlxLoraError(
            f"{ckpt} was trained with {k}={old}, now {new}; resume with the same data and flags"
        )
    run.state.max_steps = run.total_steps


def _compile_step(run: Run) -> Callable:
    """Loss and gradients of one micro-batch (a :class:`Batch`).

    The packed path through :mod:`mlx_lora.train.forward` runs eagerly: every batch has its own
    exact
    shapes and per-example attention, and its hot element-wise work is compiled kernels of its
    own (:mod:`mlx_lora.model.kernels`). The others are compiled once per batch shape (rows and
    lengths
    padded to multiples of 32, so shapes repeat); the model and the RNG (dropout) are the state
    the compiled graph reads and updates."""
    checkpoint = run.recompute.on
    if run.eager:
        value_and_grad = nn.value_and_grad(
            run.model,
            lambda m, *a, layout=None: loss_sum(m, *a, checkpoint=checkpoint, layout=layout),
        )

        def step(b: Batch):
            layout = Layout.from_segments(b.segments, b.targets, b.weights)
            return value_and_grad(run.model, *batch_arrays(b), layout=layout)

        return step
    if run.path == "packed":
        value_and_grad = nn.value_and_grad(
            run.model, lambda m, *a: loss_sum(m, *a, checkpoint=checkpoint)
        )
    else:
        if checkpoint:
            checkpoint_layers(run.model)
        value_and_grad = nn.value_and_grad(run.model, general_loss_sum)
    state = [run.model.state, mx.random.state]
    compiled = mx.compile(lambda *a: value_and_grad(run.model, *a), inputs=state, outputs=state)
    return lambda b: compiled(*batch_arrays(b))


def _compile_update(run: Run) -> None:
    """The per-tensor element-wise work of an update (hundreds of small LoRA tensors), compiled:
    shapes never change, so each is traced once. Made after a resume replaced the state."""
    run.finish_grads = mx.compile(partial(scale_and_clip, max_norm=run.cfg.max_grad_norm))
    state = [run.model.state, run.optimizer.state]
    run.apply_update = mx.compile(
        lambda g: run.optimizer.update(run.model, g), inputs=state, outputs=state
    )


def scale_and_clip(grads: dict, inv: mx.array, max_norm: float) -> tuple[dict, mx.array]:
    """Summed gradients → mean per target token, clipped to ``max_norm`` (0: not clipped)."""
    grads = tree_map(lambda x: x * inv, grads)
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))


def _schedule_state(
    cfg: TrainConfig, model: nn.Module, n_train: int, group: Any
) -> tuple[optim.Optimizer, TrainerState, int, int]:
    """The optimizer over the trainable weights, and the trainer state of a fresh run (with the
    settings a resume must not change)."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * group.size()
    steps_per_epoch = math.ceil(n_train / per_step)
    total = (
        cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    )
    optimizer = make_optimizer(cfg, total)
    optimizer.init(model.trainable_parameters())
    run_keys = {
        "train_examples": n_train,
        "per_step": per_step,
        "batch": cfg.per_device_train_batch_size,
        "seed": cfg.seed,
        "packing": cfg.packing,
        "max_seq_length": cfg.max_seq_length,
        "optim": optimizer.__class__.__name__,
        "method": cfg.method,
    }
    state = TrainerState(max_steps=total, num_train_epochs=total / steps_per_epoch, run=run_keys)
    return optimizer, state, steps_per_epoch, total


def setup(cfg: TrainConfig) -> tuple[Run, Path | None]:
    """Output folder, model, data, LoRA, optimizer; returns the run and the checkpoint to resume."""
    validate_train(cfg)
    group = mx.distributed.init()
    out = Path(cfg.output_dir)
    lead = group.rank() == 0
    model_dir = resolve_model(cfg.model, cfg.model_source)
    sources = {"--model": model_dir, "--data": cfg.data, "--eval-data": cfg.eval_data}
    check_apart(out, sources)
    shape = read_shape(model_dir)  # a model mlx-lm cannot build fails here, before the tokenizer
    check_flags(cfg, shape)
    tokenizer = load_base_tokenizer(model_dir)
    ds, train_ex, val_ex = run_examples(cfg, tokenizer, group.size())
    memory = check_memory(cfg, model_dir, train_ex, group.size(), shape)  # before any weight
    recompute = decide_checkpointing(cfg.gradient_checkpointing, memory)
    resume_from = (
        prepare_output_dir(out, cfg.resume, cfg.overwrite_output_dir)
        if lead
        else resume_point(out, cfg.resume)
    )
    model, config = _load(cfg, model_dir, tokenizer)
    mx.random.seed(cfg.seed)
    saver = _prepare_model(cfg, model, ds, model_dir, config)
    model.train()
    optimizer, state, steps_per_epoch, total = _schedule_state(cfg, model, len(train_ex), group)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path = training_path(config.get("model_type"))
    text = summary(
        cfg,
        ds,
        len(train_ex),
        len(val_ex),
        model,
        steps_per_epoch,
        total,
        group.size(),
        recompute.reason,
    )
    text += "\n" + _path_line(path, config, path == "packed" and fast_path(model))
    text += "\n" + memory.report()
    run = Run(
        cfg,
        out,
        group,
        model,
        tokenizer,
        train_ex,
        val_ex,
        saver,
        optimizer,
        state,
        steps_per_epoch,
        total,
        pad_id,
        text,
    )
    run.path = path
    run.recompute = recompute
    run.eager = path == "packed" and fast_path(model)
    if cfg.method != "sft":
        run.method = make_method(cfg, run, model_dir, config)
        run.summary += "\n" + method_line(cfg)
    if resume_from is not None:
        _resume(run, resume_from)
    if run.method is not None:
        run.loss_and_grad = lambda b: run.method.step(run.model, b)
    else:
        run.loss_and_grad = _compile_step(run)
    _compile_update(run)
    if run.eager:
        keep_buffers()
    return run, resume_from


def beta_of(cfg: TrainConfig) -> float:
    return cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.method]


def make_method(cfg: TrainConfig, run: Run, model_dir: Path, config: dict) -> Any:
    """The objective of ``--method``; ``--ref-adapter``'s tensors start the policy and are the
    reference (swapped in for its forward), else the reference is the adapter switched off."""
    reference = ReferenceSwap()
    if cfg.ref_adapter:
        ref = read_adapter(Path(cfg.ref_adapter))
        check_fits(run.model, ref.tensors, f"--ref-adapter {cfg.ref_adapter}", ref.base_model)
        set_lora_tensors(run.model, ref.tensors)
        reference = ReferenceSwap(dict(lora_params_of(ref.tensors)))
    if cfg.method == "grpo":
        settings = Settings(
            cfg.num_generations,
            cfg.max_completion_length,
            cfg.temperature,
            cfg.epsilon,
            beta_of(cfg),
            cfg.system_prompt,
        )
        rewards = load_rewards(cfg.reward, cfg.reward_pattern)
        return GRPOMethod(
            settings, rewards, run.tokenizer, model_dir, config, run.path, run.recompute.on,
            run.eager, reference,
        )  # fmt: skip
    objective = Objective(
        cfg.method,
        beta_of(cfg),
        cfg.loss_type,
        cfg.label_smoothing,
        cfg.simpo_gamma,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )
    return PreferenceMethod(objective, run.path, run.recompute.on, run.eager, reference)


def method_line(cfg: TrainConfig) -> str:
    """The start-up line of a preference run: objective, hyper-parameters, reference."""
    if cfg.method == "grpo":
        kl = f", KL to {'--ref-adapter' if cfg.ref_adapter else 'the base'}" if cfg.beta else ""
        return (
            f"method: grpo, {cfg.num_generations} answers per prompt of up to "
            f"{cfg.max_completion_length} tokens at temperature {cfg.temperature}, clip "
            f"{cfg.epsilon}, beta {beta_of(cfg)}{kl}; rewards: {cfg.reward}"
        )
    if cfg.method in NEEDS_REFERENCE:
        ref = f"--ref-adapter {cfg.ref_adapter}" if cfg.ref_adapter else "the base, adapter off"
        ref = f"; reference: {ref}, once per micro-batch"
    else:
        ref = "; no reference model"
    kind = f" ({cfg.loss_type})" if cfg.method == "dpo" else ""
    extra = f", gamma {cfg.simpo_gamma}" if cfg.method == "simpo" else ""
    per = "2 sequences per pair" if cfg.method != "kto" else "completion + KL row per example"
    return f"method: {cfg.method}{kind}, beta {beta_of(cfg)}{extra}{ref}; {per}, one packed forward"


def special_text_line(ds: Dataset) -> str:
    """The start-up line for records that mention special tokens (empty when none do)."""
    if not ds.special_text:
        return ""
    how = (
        "parsed as control tokens (--allow-special-tokens-in-content)"
        if ds.allow_special
        else "encoded as text"
    )
    records = "1 record mentions" if ds.special_text == 1 else f"{ds.special_text} records mention"
    return f"data: {records} special tokens; {how}\n"


def _path_line(path: str, config: dict, eager: bool = False) -> str:
    kind = config.get("model_type")
    if path == "packed":
        how = "; attention per example, rows side by side on the CPU" if eager else ""
        return (
            f"path: packed rows, target-only vocabulary projection ({kind} blocks driven here{how})"
        )
    return (
        f"path: general — {kind} runs its own forward, one example per row (no packing; the "
        "packed path drives qwen2, qwen3, llama and mistral blocks only)"
    )


def summary(
    cfg: TrainConfig,
    ds: Dataset,
    n_train: int,
    n_val: int,
    model: nn.Module,
    steps_per_epoch: int,
    total_steps: int,
    world: int = 1,
    checkpointing: str = "",
) -> str:
    """The start-up lines: data, model and schedule as this run will use them."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    kind = (
        "DoRA" if uses_dora(cfg) else {"lora": "LoRA", "full": "full fine-tune"}[cfg.finetune_type]
    )
    total = get_total_parameters(model)  # logical count: quantized weights count as unpacked
    eff = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    procs = f" × {world} processes" if world > 1 else ""
    skipped = f", {ds.skipped} skipped (missing/empty fields)" if ds.skipped else ""
    trunc = f", {ds.truncated} truncated to {cfg.max_seq_length} tokens" if ds.truncated else ""
    dropped = ""
    if ds.dropped_no_target:
        dropped = f", {ds.dropped_no_target} dropped (no answer left after truncation)"
    quant = f", base quantized to {cfg.quantize} bits" if cfg.quantize else ""
    dtype = str(compute_dtype(cfg.dtype)).split(".")[-1]
    return (
        f"data: {ds.records} records ({ds.format}) → {len(ds.examples)} examples "
        f"kept{skipped}{trunc}{dropped}; {n_train} train / {n_val} validation; "
        f"{ds.tokens:,} tokens, {ds.target_tokens:,} trained on\n"
        f"{special_text_line(ds)}"
        f"model: {trainable:,} trainable parameters ({kind}) of {total:,} "
        f"({100 * trainable / max(total, 1):.3f}%); device {device_name()}, dtype {dtype}{quant}\n"
        f"schedule: {steps_per_epoch} steps/epoch, {total_steps} steps, effective batch {eff} "
        f"({cfg.per_device_train_batch_size} × {cfg.gradient_accumulation_steps} "
        f"accumulation{procs}), packing {'on' if cfg.packing else 'off'}, gradient "
        f"checkpointing {checkpointing or ('on' if cfg.gradient_checkpointing else 'off')}"
    )


# ---------------------------------------------------------------- one step, evaluation


@dataclass
class Meter:
    """Running counts of a run (this process's share): what tokens/s and the log lines report."""

    window_loss: float = 0.0
    window_steps: int = 0
    tokens: int = 0
    targets: int = 0
    step_time: float = 0.0  # compute only: no evaluation, no checkpoint writing
    steps: int = 0
    last_eval: float | None = None
    last_good: Path | None = None
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.step_time, 1e-9)


def train_step(run: Run, meter: Meter) -> tuple[float, float]:
    """One optimizer step over the step's examples (micro-batches, all ranks); (loss, grad norm).

    Token losses are summed over micro-batches and ranks and divided once by the number of target
    tokens (preference methods: of pairs, completions), so batch 2 × accumulation 2 is the same
    update as batch 4.
    """
    cfg, step = run.cfg, run.state.global_step
    ids = step_examples(step, len(run.train_ex), run.per_step, run.steps_per_epoch, cfg.seed)
    ids = rank_share(ids, run.rank, run.world)
    bs = cfg.per_device_train_batch_size
    layout = {"pad_to": 1, "lanes": run.lanes} if run.eager else {}
    build = run.method.batch if run.method is not None else make_batch
    micro = [
        build(
            [run.train_ex[j] for j in ids[i : i + bs]],
            cfg.max_seq_length,
            run.packing,
            run.pad_id,
            **layout,
        )
        for i in range(0, len(ids), bs)
    ]
    units = run.method.units if run.method is not None else lambda b: b.n_target_tokens
    n_targets = all_sum(float(sum(units(b) for b in micro)), run.group)
    mx.random.seed((cfg.seed * 1_000_003 + step) * 1_009 + run.rank)  # dropout: step and rank only
    grads, loss_total = None, 0.0
    for b in micro:
        loss, g = run.loss_and_grad(b)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, grads)
        loss_total += loss.item()
        meter.tokens += b.n_tokens
        meter.targets += b.n_target_tokens
    if grads is None:  # an empty share at an epoch's end still joins the all-reduce
        grads = tree_map(mx.zeros_like, run.model.trainable_parameters())
    if run.world > 1:  # sum over ranks = the gradient of the whole global batch
        grads = tree_map(lambda g: g * run.world, nn.average_gradients(grads, group=run.group))
        loss_total = all_sum(loss_total, run.group)
    grads, grad_norm = run.finish_grads(grads, mx.array(1.0 / max(n_targets, 1)))
    step_loss, norm = loss_total / max(n_targets, 1), grad_norm.item()
    if not math.isfinite(step_loss) or not math.isfinite(norm):
        where = (
            f"the last good checkpoint is {meter.last_good}"
            if meter.last_good
            else "no checkpoint was saved yet"
        )
        raise MlxLoraError(
            f"loss became {step_loss} at step {step + 1}; training stopped, {where}; lower "
            "--learning-rate and --resume"
        )
    run.apply_update(grads)
    mx.eval(run.model.parameters(), run.optimizer.state)
    return step_loss, norm


def _log_train(run: Run, meter: Meter, reporter: Reporter, grad_norm: float) -> None:
    state = run.state
    last = state.global_step == run.total_steps
    lr = 0.0 if last else float(f"{run.optimizer.learning_rate.item():.6g}")
    record = {
        "loss": meter.window_loss / meter.window_steps,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "epoch": round(state.epoch, 4),
    }
    if run.method is not None:  # TRL's metric names beside the loss line
        record |= {k: round(v, 6) for k, v in run.method.pop_metrics().items()}
    reporter.log(record, state.global_step)
    state.log_history.append({**record, "step": state.global_step})
    meter.window_loss, meter.window_steps = 0.0, 0


def _evaluate(run: Run, meter: Meter, reporter: Reporter) -> None:
    """``eval_loss`` on the validation examples (preference methods: their loss and metrics)."""
    cfg, state, step = run.cfg, run.state, run.state.global_step
    metrics: dict[str, float] = {}
    if run.method is not None:
        meter.last_eval, metrics = run.method.evaluate(
            run.model,
            run.val_ex,
            cfg.per_device_train_batch_size,
            cfg.max_seq_length,
            cfg.packing,
            run.pad_id,
        )
    else:
        meter.last_eval = evaluate(
            run.model,
            run.val_ex,
            cfg.per_device_train_batch_size,
            cfg.max_seq_length,
            cfg.packing,
            run.pad_id,
            run.group,
            run.path,
        )
    record = {"eval_loss": meter.last_eval, "epoch": round(state.epoch, 4)}
    record |= {f"eval_{k}": round(v, 6) for k, v in metrics.items()}
    reporter.log(record, step)
    state.log_history.append({**record, "step": step})


def _evaluate_and_save(run: Run, meter: Meter, reporter: Reporter, stopping: bool) -> None:
    """Evaluation every ``--eval-steps``; checkpoints every ``--save-steps``, at an improvement
    when early stopping watches ``eval_loss``, and when the run is being stopped (Ctrl-C)."""
    cfg, state = run.cfg, run.state
    step = state.global_step
    eval_steps = cfg.eval_steps or cfg.save_steps
    evaluate_now = bool(run.val_ex) and (step % eval_steps == 0 or step == run.total_steps)
    if evaluate_now:
        _evaluate(run, meter, reporter)
    patience = cfg.early_stopping_patience
    improved = evaluate_now and (state.best_metric is None or meter.last_eval < state.best_metric)
    if evaluate_now:
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
    save_now = step % cfg.save_steps == 0 or (evaluate_now and bool(patience))
    if save_now or stopping or (improved and patience):
        if improved:
            state.best_metric = meter.last_eval
            state.best_model_checkpoint = str(run.out / f"checkpoint-{step}")
        if run.lead:
            meter.last_good = save_checkpoint(run.out, run.model, run.optimizer, state, run.saver)
            prune_checkpoints(run.out, cfg.save_total_limit, state.best_model_checkpoint)
    elif improved:
        state.best_metric, state.best_model_checkpoint = meter.last_eval, None
    if patience and state.evals_without_improvement >= patience:
        meter.stopped_early = True
        reporter.message(f"early stopping: eval_loss has not improved for {patience} evaluations")


@contextmanager
def _interruptible() -> Iterator[dict]:
    """The first Ctrl-C sets ``flag``: the loop finishes its step, checkpoints and stops."""
    stop = {"flag": False}
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        stop["flag"] = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def loop(run: Run, reporter: Reporter, stop: dict) -> Meter:
    """Steps until the end, an early stop or a Ctrl-C; checkpoints and logs along the way."""
    meter = Meter()
    existing = checkpoints(run.out)
    meter.last_good = existing[-1] if existing else None
    with cpu_lanes(run.cfg.per_device_train_batch_size if run.eager else 1) as n_lanes:
        run.lanes = n_lanes
        _steps(run, meter, reporter, stop)
    return meter


def _steps(run: Run, meter: Meter, reporter: Reporter, stop: dict) -> None:
    """The loop's body, step after step, inside the lanes :func:`loop` set up."""
    state = run.state
    while state.global_step < run.total_steps and not stop["flag"]:
        t_step = time.perf_counter()
        loss, grad_norm = train_step(run, meter)
        meter.step_time += time.perf_counter() - t_step
        meter.steps += 1
        state.global_step += 1
        state.epoch = state.global_step / run.steps_per_epoch
        meter.window_loss += loss
        meter.window_steps += 1
        reporter.step(state.global_step, loss, meter.tokens_per_second, mx.get_peak_memory())
        if state.global_step % run.cfg.logging_steps == 0 or state.global_step == run.total_steps:
            _log_train(run, meter, reporter, grad_norm)
        _evaluate_and_save(run, meter, reporter, stop["flag"])
        if meter.stopped_early:
            break


def finish(run: Run, meter: Meter, runtime: float) -> tuple[TrainResult, dict, str]:
    """The final adapter, ``trainer_state.json`` with HF's closing record, ``loss.png``; returns
    the result, HF's closing record and the last line for humans."""
    state, out = run.state, run.out
    tps, peak = meter.tokens_per_second, mx.get_peak_memory() / 1e9
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    train_loss = float(np.mean(losses)) if losses else float("nan")
    best = state.best_model_checkpoint
    result = TrainResult(
        out,
        state.global_step,
        train_loss,
        meter.last_eval,
        best,
        tps,
        peak,
        meter.stopped_early,
        run.recompute.on,
    )
    final = {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(meter.steps * run.per_step / max(runtime, 1e-9), 3),
        "train_steps_per_second": round(meter.steps / max(runtime, 1e-9), 3),
        "train_loss": train_loss,
        "epoch": round(state.epoch, 4),
    }
    what = "model" if run.cfg.finetune_type == "full" else "adapter"
    text = f"{what} saved to {out} ({tps:,.0f} tokens/s, peak memory {human_bytes(peak * 1e9)})"
    if not run.lead:
        return result, final, text
    save_final(out, run.model, run.saver, best if meter.stopped_early else None, meter.last_good)
    state.log_history.append(
        {
            **final,
            "step": state.global_step,
            "train_tokens_per_second": round(tps, 2),
            "train_tokens": meter.tokens,
            "train_target_tokens": meter.targets,
            "peak_memory_gb": round(peak, 4),
        }
    )
    try:
        write_json_atomic(out / STATE_FILE, asdict(state))
        if run.cfg.plot:
            plot_losses(state.log_history, out / PLOT_FILE)
    except (OSError, RuntimeError) as e:
        raise MlxLoraError(
            f"the adapter is saved in {out}, but {STATE_FILE} or {PLOT_FILE} could not be written "
            f"({write_error_detail(e)}); free disk space"
        ) from None
    return result, final, text


def _reporter(run: Run, reporter: Reporter | None, progress: bool, resumed: bool) -> Reporter:
    """The given reporter (or the default one) plus the ``--report-to`` trackers, on rank 0."""
    names = parse_report_to(run.cfg.report_to)
    trackers = []
    if run.lead and names:
        c = run.cfg
        trackers = open_trackers(names, run.out, c.run_name, c.project_name, resumed)
        run.trackers = trackers
    if reporter is None:
        return default_reporter(lead=run.lead, progress=progress, trackers=trackers)
    return Fanout(reporter, *trackers) if trackers else reporter


def _eval_at_end(cfg: TrainConfig) -> str:
    """``--eval-at-end``: :mod:`mlx_lora.eval.compare` on the finished adapter; its one-line
    verdict."""

    r = evaluate_adapter(
        EvalConfig(adapter=cfg.output_dir, model=cfg.model, model_source=cfg.model_source)
    )
    return (
        f"eval: base loss {r.base_loss:.4f} → tuned {r.tuned_loss:.4f} "
        f"({r.tuned_loss - r.base_loss:+.4f}) on {r.examples} held-out examples; "
        f"{Path(cfg.output_dir) / 'eval.html'}"
    )


def train(
    cfg: TrainConfig, *, progress: bool = True, reporter: Reporter | None = None
) -> TrainResult:
    """Run one training job end to end; what the CLI, the studio and tests call.

    ``reporter`` replaces the console (and ``MLX_LORA_EVENTS``) output; ``--report-to`` trackers
    are added to it either way.
    """
    parse_report_to(cfg.report_to)  # a missing tracker package fails before anything loads
    run, resumed = setup(cfg)
    reporter = _reporter(run, reporter, progress, resumed is not None)
    info = {
        "step": run.state.global_step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "summary": run.summary,
        "resumed_from": str(resumed) if resumed is not None else None,
    }
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    reporter.start(info, asdict(cfg))
    if run.lead:
        save_tracker_state(run.out, run.trackers)
    try:
        with _interruptible() as stop:
            meter = loop(run, reporter, stop)
        if stop["flag"]:  # the CLI prints this one line and exits 130
            raise KeyboardInterrupt(f"interrupted: saved {meter.last_good}; continue with --resume")
        result, final, text = finish(run, meter, time.perf_counter() - t0)
        if cfg.eval_at_end and run.lead:
            reporter.message(_eval_at_end(cfg))
    except KeyboardInterrupt as e:
        reporter.end("interrupted", str(e) or "interrupted")
        raise
    except MlxLoraError as e:
        reporter.end("error", str(e))
        raise
    reporter.end("finished", text, final)
    return result
