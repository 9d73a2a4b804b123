"""``python -m mlx_lora.plan``: will this training run fit in this machine's memory? Know before.

The seed's author lost days to out-of-memory errors ("close the other apps"). The plan predicts
the peak memory of ``python -m mlx_lora.train`` with the same flags from the model's
``config.json`` alone (no weight is read; :mod:`mlx_lora.plan.footprint` has the parts): weights,
LoRA + optimizer, activations (with and without gradient checkpointing), the loss, the load
itself and the process around MLX; and compares it with this machine's memory
(:func:`machine_budget`). ``train`` prints the same plan, decides ``--gradient-checkpointing
auto`` with it, and stops before loading any weight when the run does not fit, naming the
cheapest change that does (``--force`` overrides).

Activations depend on the micro-batches' real shapes. ``train`` plans for the worst micro-batch
of the run it is about to do (its batches are a pure function of the data and the seed); ``plan``
does the same when ``--data`` is given, and otherwise assumes every micro-batch is ``batch``
examples of ``--max-seq-length`` tokens, all trained on: the most any data can need.

API::

    p = plan(cfg, examples)              # TrainConfig (+ encoded examples) -> Plan
    p.fits                               # fits (predicted peak + 10%), checkpointing as decided
    p.checkpointing                      # the setting train uses (auto: off when it fits without)
    p.peak_bytes(checkpointing=False)    # predicted process peak with checkpointing off (or on)
    p.report()                           # the text the CLI and train print
    suggest(cfg, examples)               # (TrainConfig, Plan) of the fastest config that fits
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_lora.config import TrainConfig, opt
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.units import human_bytes as gb
from mlx_lora.core.units import parse_size
from mlx_lora.data.dataset import epoch_order, padded_targets
from mlx_lora.data.prepare import run_examples
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.load import load_base_tokenizer, on_gpu
from mlx_lora.model.prompt import Encoded
from mlx_lora.plan import footprint as fp
from mlx_lora.plan.footprint import MicroBatch, ModelShape, dtype_name
from mlx_lora.train.forward import lane_count

MARGIN = 0.10  # fits = predicted peak × 1.10 <= budget
# Examples run_batches lays out one by one (~70 µs each): a run longer than this (10^12 steps) is
# planned for its first ones and for the heaviest micro-batch any step could draw.
MAX_LAID_OUT = 100_000
LIMIT_ENV = "MLX_LORA_MEMORY_LIMIT"  # e.g. "2GB": stands in for a smaller machine
# The process outside MLX (Python, MLX, mlx-lm, transformers, OpenBLAS, the tokenizer and the
# data): measured peak RSS − MLX peak of training runs, a base plus a tokenizer part.
RUNTIME_BASE = 110e6
RUNTIME_PER_VOCAB = 300
CPU_NOTE = (
    "  (coefficients measured on a CPU with MLX's peak counter; a GPU prediction uses the same "
    "terms with bf16 activations and fused attention: derived, not measured)"
)


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Budget:
    """How much memory the run may use, and where that number comes from."""

    bytes: int | None
    source: str


def machine_budget() -> Budget:
    """The memory a run may use: ``MLX_LORA_MEMORY_LIMIT``, else Metal's recommended working set
    (a Mac's GPU), else what Linux reports as available now (``MemAvailable``). The one reader:
    the plan, ``train``'s refusal and ``--gradient-checkpointing auto`` all use it."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return Budget(parse_size(limit, LIMIT_ENV), f"{LIMIT_ENV}={limit}")

    if on_gpu():
        import mlx.core as mx

        info = mx.device_info()
        if info.get("max_recommended_working_set_size"):
            total = round(info.get("memory_size", 0) / 2**30)  # the size Apple sells it as
            return Budget(
                int(info["max_recommended_working_set_size"]),
                f"Metal's recommended working set of this {total:.0f} GB Mac",
            )
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kb = {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines)}
        return Budget(kb["MemAvailable"], f"available now of {gb(kb['MemTotal'])} (/proc/meminfo)")
    except (OSError, KeyError, ValueError):
        return Budget(None, "unknown (no Metal device information, no /proc/meminfo)")


# ---------------------------------------------------------------- batches


def sequences_per_example(cfg: TrainConfig) -> int:
    """Sequences one example puts through the forward: a pair's two, KTO's completion and KL
    row, GRPO's group."""
    return {"sft": 1, "grpo": cfg.num_generations}.get(cfg.method, 2)


def _sequences(cfg: TrainConfig, e: Any) -> list[tuple[int, int]]:
    """(length, trained tokens) of each sequence example ``e`` puts through the forward."""
    cap = cfg.max_seq_length
    if cfg.method == "grpo":  # answers as long as allowed, all trained on
        n = min(len(e.ids) + cfg.max_completion_length, cap)
        return [(n, n - len(e.ids))] * cfg.num_generations
    seqs = list(getattr(e, "sequences", (e,)))
    if cfg.method == "kto":
        seqs = seqs * 2  # the KL row: another answer after this prompt, about as long
    return [(min(len(q.ids), cap), sum(q.mask[1:cap])) for q in seqs]


def worst_case_batch(cfg: TrainConfig, shape: ModelShape, lanes: int = 1) -> MicroBatch:
    """``batch`` examples of ``--max-seq-length`` tokens, all trained on: the most data needs.
    A full-length example fills a row of its own, so the batch is ``batch`` copies of one row
    (computed so: a batch of a billion is planned as fast as one of four)."""
    n = cfg.max_seq_length
    bs = cfg.per_device_train_batch_size * sequences_per_example(cfg)
    one = fp.layout([n], [n - 1], n, shape.path, cfg.packing, lanes)
    targets = one.targets * bs if shape.path == "fast" else padded_targets((n - 1) * bs)
    return MicroBatch(one.tokens * bs, one.attention * bs, targets, one.rows * bs, one.length)


def heaviest_batch(
    cfg: TrainConfig, shape: ModelShape, lengths: list[int], trained: list[int], lanes: int
) -> MicroBatch:
    """A micro-batch at least as heavy as any step can draw: the ``batch`` longest sequences with
    the ``batch`` largest target counts (a pair is two sequences), for a run too long to lay out
    step by step."""
    bs = min(cfg.per_device_train_batch_size * sequences_per_example(cfg), len(lengths))
    longest = sorted(lengths, reverse=True)[:bs]
    most = sorted(trained, reverse=True)[:bs]
    return fp.layout(longest, most, cfg.max_seq_length, shape.path, cfg.packing, lanes)


def run_steps(cfg: TrainConfig, n: int, world: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, steps of the run, steps :func:`run_batches` lays out one by one) for
    ``n`` training examples."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    per_epoch = math.ceil(n / per_step)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    return per_epoch, total, min(total, max(per_epoch, MAX_LAID_OUT // max(1, min(per_step, n))))


def run_batches(
    cfg: TrainConfig, shape: ModelShape, examples: list, world: int = 1, lanes: int = 1
) -> list[MicroBatch]:
    """The distinct micro-batches of the run ``train`` will do with these examples: the same
    steps (:func:`mlx_lora.train.loop.step_examples`), rank shares and layout, without the
    tokens. Past :data:`MAX_LAID_OUT` examples (at least one epoch), the rest of the run is
    represented by :func:`heaviest_batch`."""

    n, bs = len(examples), cfg.per_device_train_batch_size
    if n == 0:
        return []
    seqs = [_sequences(cfg, e) for e in examples]
    lengths = [length for s in seqs for length, _ in s]
    trained = [target for s in seqs for _, target in s]
    per_step = bs * cfg.gradient_accumulation_steps * world
    per_epoch, total, laid_out = run_steps(cfg, n, world)
    seen: set[tuple[int, ...]] = set()
    shapes: set[MicroBatch] = set()
    if laid_out < total:
        shapes.add(heaviest_batch(cfg, shape, lengths, trained, lanes))
    for epoch in range(math.ceil(laid_out / per_epoch)):
        order = epoch_order(n, cfg.seed, epoch)
        for pos in range(min(per_epoch, laid_out - epoch * per_epoch)):
            ids = order[pos * per_step : (pos + 1) * per_step]
            per_rank = -(-len(ids) // world)
            for r in range(world):
                share = ids[r * per_rank : (r + 1) * per_rank]
                for i in range(0, len(share), bs):
                    key = tuple(sorted(share[i : i + bs].tolist()))
                    if key not in seen:
                        seen.add(key)
                        ls = [n for j in key for n, _ in seqs[j]]
                        ts = [t for j in key for _, t in seqs[j]]
                        shapes.add(
                            fp.layout(ls, ts, cfg.max_seq_length, shape.path, cfg.packing, lanes)
                        )
    return sorted(shapes)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Predicted peak memory of one training run, by part, and whether it fits this machine."""

    cfg: TrainConfig
    shape: ModelShape
    budget: Budget
    batches: list[MicroBatch]
    data_note: str
    gpu: bool
    model_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # GRPO: the longest prompt its sampling starts from

    @property
    def nbytes(self) -> int:
        """Bytes per value of the compute dtype (``auto``: bf16 on a GPU, fp32 on a CPU)."""
        if self.cfg.dtype == "auto":
            return 2 if self.gpu else 4
        return fp.DTYPE_BYTES[self.cfg.dtype]

    @property
    def bits(self) -> int | None:
        return self.cfg.quantize or self.shape.stored_bits

    def weights(self) -> dict[str, int]:
        return fp.weight_bytes(self.shape, self.nbytes, self.bits)

    def state_bytes(self) -> tuple[int, int, int]:
        """(trained values, their gradients, optimizer state) in bytes. LoRA values are fp32; a
        full fine-tune trains the weights themselves (counted in :meth:`weights`)."""
        shapes = fp.trained_shapes(self.cfg, self.shape)
        full = self.cfg.finetune_type == "full"
        each = self.nbytes if full else 4
        n = sum(math.prod(s) for s in shapes)
        return (
            0 if full else n * each,
            n * each,
            fp.optimizer_values(self.cfg.optim, shapes) * each,
        )

    def worst(self, checkpointing: bool) -> tuple[MicroBatch, int, int]:
        """The micro-batch with the largest activations + loss, and those two terms."""
        best: tuple[MicroBatch, int, int] | None = None
        for mb in self.batches:
            act, loss = fp.activation_bytes(
                self.cfg, self.shape, mb, self.nbytes, checkpointing, self.gpu
            )
            if best is None or act + loss > best[1] + best[2]:
                best = (mb, act, loss)
        assert best is not None
        return best

    def train_bytes(self, checkpointing: bool) -> int:
        """MLX's peak while training: during a backward pass (weights, state, the gradients
        accumulated so far and being made, activations, loss) or during the update (new
        values and optimizer state are made before the old ones are released)."""
        own, grads, optim = self.state_bytes()
        weights = sum(self.weights().values())
        _, act, loss = self.worst(checkpointing)
        accumulated = grads if self.cfg.gradient_accumulation_steps > 1 else 0
        backward = weights + own + optim + accumulated + grads + act + loss
        new_values = grads  # the updated values have the size of their gradients
        update = weights + own + new_values + 2 * optim + grads
        return max(backward, update, weights + own + optim + self.generation_bytes())

    def generation_bytes(self) -> int:
        """GRPO: the sampling's KV cache and prefill (0 for the other methods)."""
        if self.cfg.method != "grpo":
            return 0
        return fp.generation_bytes(
            self.shape, self.prompt_tokens, self.cfg.max_completion_length, self.nbytes
        )

    def load_bytes(self) -> int:
        return sum(self.weights().values()) + fp.load_extra_bytes(
            self.shape, self.nbytes, self.bits
        )

    def mlx_peak_bytes(self, checkpointing: bool | None = None) -> int:
        """Predicted MLX peak (``mx.get_peak_memory()``): loading or training, whichever is more."""
        return max(self.load_bytes(), self.train_bytes(self._ckpt(checkpointing)))

    def peak_bytes(self, checkpointing: bool | None = None) -> int:
        """Predicted peak of the whole process: MLX's peak plus Python, libraries, tokenizer."""
        return self.mlx_peak_bytes(checkpointing) + self.runtime_bytes()

    def runtime_bytes(self) -> int:
        return int(RUNTIME_BASE + RUNTIME_PER_VOCAB * self.shape.vocab)

    def fits_with(self, checkpointing: bool | None = None) -> bool:
        if self.budget.bytes is None:
            return True
        return self.peak_bytes(checkpointing) * (1 + MARGIN) <= self.budget.bytes

    @property
    def checkpointing(self) -> bool:
        """The setting train uses: as asked, or (auto) off when the run fits without it."""
        setting = self.cfg.gradient_checkpointing
        if setting is not None:
            return setting
        return not self.fits_with(False)

    @property
    def fits(self) -> bool:
        return self.fits_with(self.checkpointing)

    def _ckpt(self, checkpointing: bool | None) -> bool:
        return self.checkpointing if checkpointing is None else checkpointing

    def report(self) -> str:
        """The plan as printed by ``python -m mlx_lora.plan`` and at the start of ``train``."""
        lines = [self._head()] + [
            f"  {name:<17}{gb(v):>9}  {note}" for name, v, note in self._rows()
        ]
        mb, _, _ = self.worst(self.checkpointing)
        lines.append(f"  {'batches':<17}{'':>9}  {self._batch_note(mb)}; {self.data_note}")
        ckpt = self.checkpointing
        peak, alt = self.peak_bytes(ckpt), self.peak_bytes(not ckpt)
        other = "without" if ckpt else "with"
        lines.append(f"  {'peak':<17}{gb(peak):>9}  ({other} gradient checkpointing: {gb(alt)})")
        if self.budget.bytes is None:
            lines.append(f"  {'machine':<17}{'?':>9}  {self.budget.source}: not checked")
        else:
            lines.append(f"  {'machine':<17}{gb(self.budget.bytes):>9}  {self.budget.source}")
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"  → {verdict}: peak + {MARGIN:.0%} = {gb(peak * (1 + MARGIN))} vs "
                f"{gb(self.budget.bytes)}"
            )
        return "\n".join(lines + self.notes + [CPU_NOTE])

    def _head(self) -> str:
        s = self.shape
        path = {"fast": "packed rows, attention per example", "packed": "packed rows, masked"}
        return (
            f"memory plan: {s.model_type}, {count(s.parameters)} parameters ({s.layers} blocks, "
            f"hidden {s.hidden}, vocabulary {s.vocab:,}); {'gpu' if self.gpu else 'cpu'}, "
            f"{dtype_name(self.nbytes)}; {path.get(s.path, 'general path, full logits')}"
        )

    def _rows(self) -> list[tuple[str, int, str]]:
        c, ckpt = self.cfg, self.checkpointing
        weights = self.weights()
        own, grads, optim = self.state_bytes()
        mb, act, loss = self.worst(ckpt)
        _, act_other, loss_other = self.worst(not ckpt)
        other = "without" if ckpt else "with"
        how = "as asked" if c.gradient_checkpointing is not None else "auto"
        kind = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tune"}[c.finetune_type]
        kind = "DoRA" if fp.uses_dora(c) else kind
        return [
            (
                "weights",
                sum(weights.values()),
                ", ".join(f"{gb(v)} {k}" for k, v in weights.items()),
            ),
            (f"{kind} + optimizer", own + grads + optim, self._state_note()),
            (
                "activations",
                act,
                f"gradient checkpointing {'on' if ckpt else 'off'} ({how}; {other} it: "
                f"{gb(act_other)})",
            ),
            (
                "loss",
                loss,
                f"vocabulary projection of {mb.targets:,} rows ({other} checkpointing: "
                f"{gb(loss_other)})",
            ),
            *self._generation_row(),
            ("loading", self.load_bytes(), "cast / quantized as read, one matrix at a time"),
            ("process", self.runtime_bytes(), "Python, MLX, tokenizer, data (outside MLX)"),
        ]

    def _generation_row(self) -> list[tuple[str, int, str]]:
        if self.cfg.method != "grpo":
            return []
        n = self.prompt_tokens + self.cfg.max_completion_length
        note = f"KV cache of {n:,} tokens (prompt + --max-completion-length) and the prefill"
        return [("generation", self.generation_bytes(), note)]

    def _state_note(self) -> str:
        shapes = fp.trained_shapes(self.cfg, self.shape)
        n = sum(math.prod(s) for s in shapes)
        kind = "float32" if self.cfg.finetune_type != "full" else dtype_name(self.nbytes)
        layers = len(fp.lora_layers(self.cfg, self.shape))
        where = "" if self.cfg.finetune_type == "full" else f" in {layers} blocks"
        return f"{count(n)} trained {kind} values{where}, gradients, {self.cfg.optim} state"

    def _batch_note(self, mb: MicroBatch) -> str:
        if self.shape.path == "fast":
            return (
                f"worst micro-batch {mb.tokens:,} tokens in {mb.rows} row(s) (longest {mb.length})"
            )
        return f"worst micro-batch {mb.rows} row(s) × {mb.length} tokens"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def check_flags(cfg: TrainConfig, shape: ModelShape) -> None:
    """The flags that need the model's shape (train's own errors, raised before anything is
    loaded): unknown ``--target-modules``, ``--lora-layers`` beyond the model's blocks."""
    if cfg.finetune_type == "full":
        return
    fp.adapted(cfg, shape)
    if cfg.lora_layers is not None and not 0 < cfg.lora_layers <= shape.layers:
        raise MlxLoraError(
            f"--lora-layers must be between 1 and the model's {shape.layers} blocks, got "
            f"{cfg.lora_layers}"
        )


def plan(
    cfg: TrainConfig,
    examples: list | None = None,
    *,
    world: int = 1,
    model_dir: Path | None = None,
    budget: Budget | None = None,
    gpu: bool | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """The memory plan of ``train(cfg)``; reads ``config.json`` only.

    ``examples`` (the encoded training examples) gives the run's real micro-batches; without them
    every micro-batch is assumed to be ``batch`` full ``--max-seq-length`` examples. ``budget``
    and ``gpu`` default to this machine (the README's "what fits" table passes a Mac's).
    """

    if model_dir is None:
        model_dir = resolve_model(cfg.model, cfg.model_source, weights=False)
    shape = shape or fp.read_shape(model_dir)
    check_flags(cfg, shape)
    gpu = on_gpu() if gpu is None else gpu
    lanes = 1 if gpu or shape.path != "fast" else lane_count(cfg.per_device_train_batch_size)
    batches = _batches(cfg, shape, examples, world, lanes)
    if examples is None:
        note = f"{cfg.max_seq_length}-token examples assumed (pass --data to plan for your data)"
    else:
        note = f"the worst of this run's {len(batches)} micro-batch shapes (from the data)"
        _, total, laid_out = run_steps(cfg, len(examples), world)
        if laid_out < total:
            note += f"; after {laid_out:,} steps, the heaviest batch any step could draw"
    prompt = max((len(e.ids) for e in examples or []), default=0) or max(
        cfg.max_seq_length - cfg.max_completion_length, 1
    )
    return Plan(
        cfg, shape, machine_budget() if budget is None else budget, batches, note, gpu, model_dir,
        prompt_tokens=prompt if cfg.method == "grpo" else 0,
    )  # fmt: skip


def _batches(
    cfg: TrainConfig, shape: ModelShape, examples: list | None, world: int, lanes: int
) -> list[MicroBatch]:
    if examples is None:
        return [worst_case_batch(cfg, shape, lanes)]
    return run_batches(cfg, shape, examples, world, lanes) or [worst_case_batch(cfg, shape, lanes)]


# ---------------------------------------------------------------- what to change


def _variants(cfg: TrainConfig, shape: ModelShape) -> list[tuple[int, float, TrainConfig]]:
    """(tier, relative time, config) of the changes worth trying. Tier 0 changes nothing in the
    result (checkpointing, the same batch split into more accumulation); 1 and 2 quantize the
    frozen base (8, then 4 bits); 3 truncates the data (shorter --max-seq-length)."""
    bs, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    splits = sorted({d for k in range(1, math.isqrt(bs) + 1) if bs % k == 0 for d in (k, bs // k)})
    quants: list[int | None] = [cfg.quantize]
    if cfg.finetune_type != "full" and not shape.stored_bits:
        quants += [b for b in (8, 4) if cfg.quantize is None or b < cfg.quantize]
    lengths = [cfg.max_seq_length]
    while lengths[-1] // 2 >= 128:
        lengths.append(lengths[-1] // 2)
    out = []
    for ckpt in (False, True):
        for k in splits:
            for q in quants:
                for n, length in enumerate(lengths):
                    tier = (3 if n else 0) + (0 if q == cfg.quantize else {8: 1, 4: 2}[q])
                    time = (4 / 3 if ckpt else 1.0) * (1 + 0.1 * math.log2(k)) * (1 + 0.05 * n)
                    new = replace(
                        cfg,
                        gradient_checkpointing=ckpt,
                        per_device_train_batch_size=bs // k,
                        gradient_accumulation_steps=acc * k,
                        quantize=q,
                        max_seq_length=length,
                    )
                    out.append((tier, time, new))
    return sorted(out, key=lambda t: (t[0], t[1]))


def suggest(
    cfg: TrainConfig, examples: list | None = None, *, world: int = 1, base: Plan | None = None
) -> tuple[TrainConfig, Plan] | None:
    """The fastest configuration that fits, preferring changes that keep the result the same;
    None when nothing does."""
    base = base or plan(cfg, examples, world=world)

    cache: dict[tuple[int, int], list[MicroBatch]] = {}
    for _, _, new in _variants(cfg, base.shape):
        key = (new.per_device_train_batch_size, new.max_seq_length)
        if key not in cache:
            fast = not base.gpu and base.shape.path == "fast"
            lanes = lane_count(new.per_device_train_batch_size) if fast else 1
            shortened = None if examples is None else _truncated(examples, new.max_seq_length)
            cache[key] = _batches(new, base.shape, shortened, world, lanes)
        p = replace(base, cfg=new, batches=cache[key])
        if p.fits:
            return new, p
    return None


def _truncated(examples: list, n: int) -> list:
    """The examples as ``load_dataset`` would truncate them at ``--max-seq-length n``, without
    those left with nothing to train on."""

    out = [Encoded(e.ids[:n], e.mask[:n]) for e in examples]
    return [e for e in out if any(e.mask[1:])]


def changes(old: TrainConfig, new: TrainConfig) -> str:
    """The flags that turn ``old`` into ``new``, as a user would type them."""
    flags = []
    if new.gradient_checkpointing != old.gradient_checkpointing:
        on = new.gradient_checkpointing
        flags.append(f"--gradient-checkpointing {'on' if on else 'off'}")
    if new.quantize != old.quantize:
        flags.append(f"--quantize {new.quantize}")
    if new.per_device_train_batch_size != old.per_device_train_batch_size:
        flags.append(
            f"--per-device-train-batch-size {new.per_device_train_batch_size} "
            f"--gradient-accumulation-steps {new.gradient_accumulation_steps}"
        )
    if new.max_seq_length != old.max_seq_length:
        flags.append(f"--max-seq-length {new.max_seq_length}")
    return " ".join(flags) or "(no change)"


def refusal(p: Plan, examples: list | None = None, world: int = 1) -> str:
    """The one-line error of a run that does not fit: how much, where, the cheapest way out."""
    need, have = p.peak_bytes() * (1 + MARGIN), p.budget.bytes or 0
    found = suggest(p.cfg, examples, world=world, base=p)
    if found is None:
        way = "no smaller configuration fits either; use a smaller model or a bigger machine"
    else:
        new, q = found
        way = f"{changes(p.cfg, new)} fits ({gb(q.peak_bytes() * (1 + MARGIN))})"
    return (
        f"this run needs about {gb(need)} (peak + {MARGIN:.0%}) but {p.budget.source} is "
        f"{gb(have)}; {way}; or pass --force to try anyway (details: python -m mlx_lora.plan)"
    )


def check(
    cfg: TrainConfig,
    model_dir: Path,
    examples: list,
    world: int = 1,
    shape: ModelShape | None = None,
) -> Plan:
    """``train``'s gate, before any weight is read: the plan of this run, or the one-line error
    of a run that does not fit (unless ``--force``)."""
    p = plan(cfg, examples, world=world, model_dir=model_dir, shape=shape)
    if not p.fits and not cfg.force:
        raise MlxLoraError(refusal(p, examples, world))
    if not p.fits:
        p.notes.append("  (--force: training anyway)")
    return p


# ---------------------------------------------------------------- the command


@dataclass
class PlanConfig(TrainConfig):
    suggest: bool = opt(False, "also print the fastest configuration that fits, and its plan")


def examples_for(cfg: TrainConfig, model_dir: Path) -> list:
    """The training examples ``train`` would use (tokenizer only, no weights)."""

    return run_examples(cfg, load_base_tokenizer(model_dir), 1)[1]


# ---------------------------------------------------------------- serving

SERVE_MAX_CONCURRENCY = 8  # beyond 8 rows a CPU decode step is compute-bound: no more throughput
SERVE_SEQUENCE_TOKENS = 4096  # the conversation length one batch slot is planned for


def kv_bytes_per_token(config: dict, nbytes: int) -> int:
    """Keys + values of one token over every layer, from ``config.json`` (text model's, if any)."""
    c = config.get("text_config") or config
    heads = int(c.get("num_attention_heads") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c.get("hidden_size") or 0) // heads)
    return 2 * int(c.get("num_hidden_layers") or 1) * kv_heads * head_dim * nbytes


def serve_concurrency(config: dict, nbytes: int, context: int) -> tuple[int, str]:
    """``serve --max-concurrency 0``: how many answers decode together, and why.

    Each slot is planned for a conversation of ``min(context, 4096)`` tokens of KV cache; half
    the memory available now (the model is already loaded) is given to the slots, and the count
    is kept between 1 and 8 (more rows make a CPU step slower by as much as they add)."""
    tokens = min(context, SERVE_SEQUENCE_TOKENS)
    per_slot = kv_bytes_per_token(config, nbytes) * tokens
    budget = machine_budget()
    if budget.bytes is None or per_slot <= 0:
        return 1, f"memory unknown ({budget.source}): 1"
    fits = int(budget.bytes // 2 // per_slot)
    n = max(1, min(SERVE_MAX_CONCURRENCY, fits))
    return n, (
        f"{n} ({gb(per_slot)} of KV cache per {tokens}-token conversation; half of "
        f"{gb(budget.bytes)} {budget.source} holds {fits}; at most {SERVE_MAX_CONCURRENCY})"
    )
