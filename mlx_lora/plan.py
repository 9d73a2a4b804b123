"""``python -m mlx_lora.plan``: will this training run fit in this machine's memory? Know before.

The seed's author lost days to out-of-memory errors ("close the other apps"). The plan predicts
the peak memory of ``python -m mlx_lora.train`` with the same flags from the model's
``config.json`` alone (no weight is read): weights (per dtype / quantization), LoRA + optimizer,
activations (with and without gradient checkpointing), the chunked loss, the load itself and the
process around MLX; and compares it with this machine's memory (macOS: Metal's recommended working
set; Linux: ``MemAvailable``; ``MLX_LORA_MEMORY_LIMIT=2GB`` stands in for a smaller machine).
``train`` prints the same plan and stops before loading any weight when it does not fit, naming
the cheapest change that does (``--force`` overrides).

Activations depend on the micro-batch's real shape (rows × padded length, target tokens).
``train`` plans for the worst micro-batch of the run it is about to do (its batches are a pure
function of the data and the seed); ``plan`` does the same when ``--data`` is given, and otherwise
assumes every micro-batch is ``batch`` full ``--max-seq-length`` rows, all trained on: the most any
data can need. The per-token coefficients were measured on this code (``scripts/bench_plan.py``
compares whole predictions with measured peaks).

API (what ``train`` and ``--gradient-checkpointing auto`` use)::

    p = plan(cfg)                        # TrainConfig -> Plan; examples=[Encoded] for real batches
    p.fits                               # the run as configured fits (predicted peak + 10% margin)
    p.peak_bytes(checkpointing=False)    # predicted process peak with checkpointing off (or on)
    p.fits_with(checkpointing=False)     # the same test for either setting
    p.report()                           # the text the CLI and train print
    suggest(cfg, examples)               # (TrainConfig, Plan) of the fastest config that fits
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_lora.config import TrainConfig, given_fields, opt, parse_config
from mlx_lora.data import pack_rows, padded_targets
from mlx_lora.errors import MlxLoraError
from mlx_lora.files import read_json
from mlx_lora.loss import LOSS_CHUNK
from mlx_lora.model import QUANT_CHUNK_BYTES, QUANT_GROUP, TRAINABLE_TYPES, on_gpu

MARGIN = 0.10  # fits = predicted peak × 1.10 <= budget
LIMIT_ENV = "MLX_LORA_MEMORY_LIMIT"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
SHORT_NAMES |= {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Linears that read the same input (one saved copy without dropout, one each with dropout).
INPUT_GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp"}
INPUT_GROUPS |= {"up_proj": "mlp", "o_proj": "o", "down_proj": "down"}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "adamw_torch": 2, "adamw_hf": 2, "sgd": 1, "muon": 1}
# The process outside MLX (Python, MLX, mlx-lm, transformers, OpenBLAS, the tokenizer and the
# data): measured peak RSS − MLX peak of training runs, a base plus a tokenizer part.
RUNTIME_BASE = 110e6
RUNTIME_PER_VOCAB = 300

# What MLX keeps for the backward pass, per token and block, in values of the compute dtype:
# multiples of the hidden and MLP widths, of the distinct inputs of the adapted linears (fp32),
# of each adapted linear's input again when LoRA dropout makes its own copy (fp32), and of the
# attention scores (heads × row length). Fitted (least squares, relative) to 110 measured peaks
# of the training step on 12 model shapes (hidden 256-1024, 2-16 blocks, rows of 128-1024
# tokens, dropout 0/0.1, targets q,v or all, checkpointing on/off): 6% RMS error on the
# activations alone; scripts/bench_plan.py checks whole predictions.
ACT_HIDDEN = 7.67
ACT_MLP = 4.35
ACT_LORA_INPUT = 0.74
ACT_DROPOUT = 0.77
ACT_SCORES = 1.41
ACT_EMBED = 2.6  # × hidden per token, once: embeddings, final norm, gathered target rows
WORKSPACE = 0.9  # the backward pass of one block needs this many blocks' worth on top
CKPT_WORKSPACE = 2.25  # checkpointing: one block recomputed and differentiated at a time
CKPT_HIDDEN = 1.25  # checkpointing: × hidden per token and block (each block's input)
# The loss: fp32 [target rows × vocabulary] values MLX keeps per target row. Measured (hidden
# 256/512, 128-1024 targets): 3.6-4.3 without checkpointing; with it the chunks are recomputed
# but MLX still evaluates them side by side: 2.5-4.6 per row, modelled as (targets + one chunk).
LOSS_LOGITS = 3.9
LOSS_LOGITS_CKPT = 2.4


# ---------------------------------------------------------------- the model, from config.json


@dataclass(frozen=True)
class Matrix:
    """A weight matrix: ``rows × cols`` (out × in), once or in every block."""

    name: str
    rows: int
    cols: int
    per_layer: bool = True


@dataclass(frozen=True)
class ModelShape:
    """What the memory depends on, read from ``config.json`` as mlx-lm builds the model."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool  # qwen2; llama's attention_bias adds o_proj's too
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # qwen3
    stored_bytes: int  # per weight in the files
    stored_bits: int | None = None  # an already quantized folder

    @property
    def linears(self) -> dict[str, Matrix]:
        """The seven linears of a block, by PEFT module name."""
        d, f = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}
        shapes |= {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        return {name: Matrix(name, *rc) for name, rc in shapes.items()}

    @property
    def matrices(self) -> list[Matrix]:
        out = [Matrix("embed_tokens", self.vocab, self.hidden, per_layer=False)]
        out += self.linears.values()
        if not self.tied:
            out.append(Matrix("lm_head", self.vocab, self.hidden, per_layer=False))
        return out

    @property
    def vectors(self) -> int:
        """Weights outside the matrices (norms, biases): never quantized."""
        d, f = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * d + (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        per_layer += (2 * f + d) * self.mlp_bias + 2 * self.head_dim * self.qk_norm
        return self.layers * per_layer + d

    def count(self, m: Matrix) -> int:
        return m.rows * m.cols * (self.layers if m.per_layer else 1)

    @property
    def parameters(self) -> int:
        return sum(self.count(m) for m in self.matrices) + self.vectors


def read_shape(model_dir: Path) -> ModelShape:
    """The model's shape from ``config.json`` (the defaults are mlx-lm's ModelArgs')."""
    path = Path(model_dir) / "config.json"
    c = read_json(path, required=True)
    kind = c.get("model_type")
    if kind not in TRAINABLE_TYPES:
        raise MlxLoraError(
            f"training {kind!r} models is not supported; supported: {', '.join(TRAINABLE_TYPES)}"
        )
    try:
        d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        quant = c.get("quantization") or {}
        llama = kind in ("llama", "mistral")
        return ModelShape(
            model_type=kind,
            hidden=d,
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or d // heads),
            intermediate=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", True)),
            qkv_bias=kind == "qwen2" or (llama and bool(c.get("attention_bias"))),
            o_bias=llama and bool(c.get("attention_bias")),
            mlp_bias=llama and bool(c.get("mlp_bias")),
            qk_norm=kind == "qwen3",
            stored_bytes=DTYPE_BYTES.get(str(c.get("torch_dtype", "bfloat16")), 2),
            stored_bits=int(quant["bits"]) if quant.get("bits") else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MlxLoraError(f"{path}: missing or bad {e} for model_type {kind!r}") from None


# ---------------------------------------------------------------- weights, adapter, optimizer


def compute_bytes(cfg: TrainConfig, gpu: bool) -> int:
    """Bytes per value of the compute dtype (``auto``: bf16 on the GPU, fp32 on the CPU)."""
    if cfg.dtype == "auto":
        return 2 if gpu else 4
    return DTYPE_BYTES[cfg.dtype]


def weight_bytes(shape: ModelShape, dtype_bytes: int, bits: int | None) -> dict[str, int]:
    """Bytes of the loaded weights by storage kind. Quantized matrices keep ``bits`` per weight
    plus a scale and a bias (compute dtype) per group of 64; the rest is in the compute dtype."""
    parts: dict[str, int] = {}
    for m in shape.matrices:
        n = shape.count(m)
        if bits and m.cols % QUANT_GROUP == 0:
            key = f"{bits}-bit matrices (group {QUANT_GROUP})"
            parts[key] = parts.get(key, 0) + n * bits // 8 + 2 * n // QUANT_GROUP * dtype_bytes
        else:
            key = f"{_dtype_name(dtype_bytes)} matrices"
            parts[key] = parts.get(key, 0) + n * dtype_bytes
    parts[f"{_dtype_name(dtype_bytes)} norms and biases"] = shape.vectors * dtype_bytes
    return parts


def _dtype_name(nbytes: int) -> str:
    return "float32" if nbytes == 4 else "bfloat16"


def load_extra_bytes(shape: ModelShape, dtype_bytes: int, bits: int | None) -> int:
    """What loading needs on top of the final weights (:func:`mlx_lora.model.materialize` reads
    one module at a time): the largest matrix as stored, plus its cast copy or one row block."""
    biggest = max(shape.matrices, key=lambda m: m.rows * m.cols)
    stored = biggest.rows * biggest.cols * shape.stored_bytes
    if shape.stored_bits:
        return biggest.rows * biggest.cols * shape.stored_bits // 8
    cast = biggest.rows * biggest.cols * dtype_bytes if dtype_bytes != shape.stored_bytes else 0
    if bits and biggest.cols % QUANT_GROUP == 0:
        return stored + min(cast, QUANT_CHUNK_BYTES * dtype_bytes // 4)
    return stored


def lora_layers(cfg: TrainConfig, shape: ModelShape) -> int:
    return min(cfg.lora_layers, shape.layers) if cfg.lora_layers else shape.layers


def targets(cfg: TrainConfig, shape: ModelShape) -> list[Matrix]:
    """The adapted linears of one block (``--target-modules``; unknown names are train's error)."""
    names = [SHORT_NAMES.get(t.strip(), t.strip()) for t in cfg.target_modules.split(",")]
    return [shape.linears[n] for n in dict.fromkeys(names) if n in shape.linears]


def trainable_parameters(cfg: TrainConfig, shape: ModelShape) -> int:
    """LoRA A and B (and DoRA's magnitudes) of every adapted block; every weight for ``full``."""
    if cfg.finetune_type == "full":
        return shape.parameters
    dora = cfg.use_dora or cfg.finetune_type == "dora"
    per = sum(cfg.lora_r * (m.rows + m.cols) + (m.rows if dora else 0) for m in targets(cfg, shape))
    return per * lora_layers(cfg, shape)


def optimizer_states(cfg: TrainConfig) -> float:
    """Optimizer state per trainable value (Adafactor's factored state is about nothing)."""
    return OPTIMIZER_STATES.get(cfg.optim, 0.05)


# ---------------------------------------------------------------- batches


@dataclass(frozen=True, order=True)
class MicroBatch:
    """The shape of one micro-batch as :func:`mlx_lora.data.make_batch` lays it out."""

    rows: int
    length: int  # padded to a multiple of 32
    targets: int  # target slots (padded to a multiple of 32)

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def worst_case_batch(cfg: TrainConfig) -> MicroBatch:
    """``batch`` rows of ``--max-seq-length`` tokens, all trained on: the most any data needs."""
    rows, length = pack_rows(
        [cfg.max_seq_length] * cfg.per_device_train_batch_size, cfg.max_seq_length
    )
    return MicroBatch(len(rows), length, padded_targets(len(rows) * (cfg.max_seq_length - 1)))


def run_batches(cfg: TrainConfig, examples: list, world: int = 1) -> list[MicroBatch]:
    """The distinct micro-batch shapes of the run ``train`` will do with these examples: the same
    steps (:func:`mlx_lora.train.step_examples`), rank shares and layout, without the tokens."""
    from mlx_lora.data import epoch_order

    n, bs = len(examples), cfg.per_device_train_batch_size
    lengths = [min(len(e.ids), cfg.max_seq_length) for e in examples]
    trained = [sum(e.mask[1 : cfg.max_seq_length]) for e in examples]
    per_step = bs * cfg.gradient_accumulation_steps * world
    per_epoch = math.ceil(n / per_step)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    seen: set[tuple[int, ...]] = set()
    shapes: set[MicroBatch] = set()
    order: Any = None
    for step in range(total):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0 or order is None:
            order = epoch_order(n, cfg.seed, epoch)
        ids = order[pos * per_step : (pos + 1) * per_step]
        per_rank = -(-len(ids) // world)
        for r in range(world):
            share = ids[r * per_rank : (r + 1) * per_rank]
            for i in range(0, len(share), bs):
                key = tuple(sorted(share[i : i + bs].tolist()))
                if key in seen:
                    continue
                seen.add(key)
                rows, length = pack_rows([lengths[j] for j in key], cfg.max_seq_length, cfg.packing)
                shapes.add(
                    MicroBatch(len(rows), length, padded_targets(sum(trained[j] for j in key)))
                )
    return sorted(shapes)


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Budget:
    """How much memory the run may use, and where that number comes from."""

    bytes: int | None
    source: str


def parse_size(text: str) -> int:
    """``2GB``, ``1.5G``, ``512MB``, ``8GiB`` or plain bytes → bytes (GB = 10⁹, GiB = 2³⁰)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text, flags=re.I)
    if not m:
        raise MlxLoraError(f"{LIMIT_ENV}={text!r} is not a size; write it like 2GB or 512MB")
    unit = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)


def machine_budget() -> Budget:
    """``MLX_LORA_MEMORY_LIMIT``, else Metal's recommended working set (macOS), else what Linux
    reports as available now (``MemAvailable``)."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return Budget(parse_size(limit), f"{LIMIT_ENV}={limit}")
    if on_gpu():
        import mlx.core as mx

        info = mx.device_info()
        if info.get("max_recommended_working_set_size"):
            total = info.get("memory_size", 0) / 1e9
            return Budget(
                int(info["max_recommended_working_set_size"]),
                f"Metal's recommended working set of this {total:.0f} GB Mac",
            )
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kb = {
            k: int(v.split()[0]) * 1024
            for k, v in fields.items()
            if k in ("MemAvailable", "MemTotal")
        }
        return Budget(
            kb["MemAvailable"], f"available now of {kb['MemTotal'] / 1e9:.1f} GB (/proc/meminfo)"
        )
    except (OSError, KeyError, ValueError):
        return Budget(None, "unknown (no Metal device information, no /proc/meminfo)")


# ---------------------------------------------------------------- the plan


def block_bytes(
    cfg: TrainConfig, shape: ModelShape, mb: MicroBatch, nbytes: int, checkpointing: bool
) -> int:
    """Activations the blocks keep for the backward pass of micro-batch ``mb``, at its peak.

    One block keeps ``saved`` (widths × tokens, attention scores × heads × rows × length², the
    adapted linears' inputs); its backward pass needs ``WORKSPACE`` blocks' worth more. Without
    checkpointing every trained block keeps its ``saved``; with it each keeps its input and one
    block at a time is recomputed. Blocks below the first adapted one (``--lora-layers``) keep
    nothing for the backward pass.
    """
    d, f = shape.hidden, shape.intermediate
    full = cfg.finetune_type == "full"
    adapted = list(shape.linears.values()) if full else targets(cfg, shape)
    distinct = {INPUT_GROUPS[m.name]: m.cols for m in adapted}
    per_token = (ACT_HIDDEN * d + ACT_MLP * f) * nbytes + ACT_LORA_INPUT * sum(
        distinct.values()
    ) * 4
    if cfg.lora_dropout > 0 and not full:
        per_token += ACT_DROPOUT * sum(m.cols for m in adapted) * 4
    scores = ACT_SCORES * shape.heads * mb.rows * mb.length**2 * nbytes
    saved = mb.tokens * per_token + scores
    once = ACT_EMBED * mb.tokens * d * nbytes
    trained = shape.layers if full else lora_layers(cfg, shape)
    if checkpointing:
        kept = trained * CKPT_HIDDEN * mb.tokens * d * nbytes
        return int(kept + CKPT_WORKSPACE * saved + once)
    return int((trained + WORKSPACE) * saved + once)


def loss_bytes(shape: ModelShape, mb: MicroBatch, nbytes: int, checkpointing: bool) -> int:
    """The vocabulary projection at the target rows (fp32 logits, ``LOSS_CHUNK`` rows at a time)
    and the gathered hidden states."""
    rows = (
        LOSS_LOGITS_CKPT * (mb.targets + LOSS_CHUNK) if checkpointing else LOSS_LOGITS * mb.targets
    )
    return int(rows * shape.vocab * 4 + 2 * mb.targets * shape.hidden * nbytes)


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

    @property
    def nbytes(self) -> int:
        return compute_bytes(self.cfg, self.gpu)

    @property
    def bits(self) -> int | None:
        return self.cfg.quantize or self.shape.stored_bits

    def weights(self) -> dict[str, int]:
        return weight_bytes(self.shape, self.nbytes, self.bits)

    def trainable_bytes(self) -> int:
        """Trainable values, their gradients (accumulated + current micro-batch) and optimizer
        state. LoRA values are fp32; a full fine-tune trains the weights in the compute dtype."""
        n = trainable_parameters(self.cfg, self.shape)
        each = self.nbytes if self.cfg.finetune_type == "full" else 4
        grads = 2 if self.cfg.gradient_accumulation_steps > 1 else 1
        own = 0 if self.cfg.finetune_type == "full" else 1  # full: the weights are counted above
        return int(n * each * (own + grads + optimizer_states(self.cfg)))

    def worst(self, checkpointing: bool) -> tuple[MicroBatch, int, int]:
        """The micro-batch with the largest activations + loss, and those two terms."""
        best = None
        for mb in self.batches:
            act = block_bytes(self.cfg, self.shape, mb, self.nbytes, checkpointing)
            loss = loss_bytes(self.shape, mb, self.nbytes, checkpointing)
            if best is None or act + loss > best[1] + best[2]:
                best = (mb, act, loss)
        assert best is not None
        return best

    def train_bytes(self, checkpointing: bool) -> int:
        _, act, loss = self.worst(checkpointing)
        return sum(self.weights().values()) + self.trainable_bytes() + act + loss

    def load_bytes(self) -> int:
        return sum(self.weights().values()) + load_extra_bytes(self.shape, self.nbytes, self.bits)

    def mlx_peak_bytes(self, checkpointing: bool | None = None) -> int:
        """Predicted MLX peak (``mx.get_peak_memory()``): loading or training, whichever is more."""
        ckpt = self._checkpointing(checkpointing)
        return max(self.load_bytes(), self.train_bytes(ckpt))

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
    def fits(self) -> bool:
        return self.fits_with(None)

    def _checkpointing(self, checkpointing: bool | None) -> bool:
        if checkpointing is None:
            return self.cfg.gradient_checkpointing is True
        return checkpointing

    def report(self) -> str:
        """The plan as printed by ``python -m mlx_lora.plan`` and at the start of ``train``."""
        c, s, ckpt = self.cfg, self.shape, self._checkpointing(None)
        weights = self.weights()
        mb, act, loss = self.worst(ckpt)
        _, act_other, loss_other = self.worst(not ckpt)
        other = "without" if ckpt else "with"
        rows = [
            (
                "weights",
                sum(weights.values()),
                ", ".join(f"{gb(v)} {k}" for k, v in weights.items()),
            ),
            (
                "LoRA + optimizer" if c.finetune_type != "full" else "training state",
                self.trainable_bytes(),
                self._trainable_note(),
            ),
            (
                "activations",
                act,
                f"gradient checkpointing {'on' if ckpt else 'off'} ({other} it: {gb(act_other)})",
            ),
            (
                "loss",
                loss,
                f"vocabulary projection at {mb.targets:,} target rows, {LOSS_CHUNK} at a time "
                f"({other} checkpointing: {gb(loss_other)})",
            ),
            (
                "loading",
                self.load_bytes(),
                "quantized as read, one matrix at a time"
                if self.bits
                else "cast as read, one matrix at a time",
            ),
            ("process", self.runtime_bytes(), "Python, MLX, tokenizer, data (outside MLX)"),
        ]
        head = (
            f"memory plan: {s.model_type}, {count(s.parameters)} parameters ({s.layers} "
            f"blocks, hidden {s.hidden}, vocabulary {s.vocab:,}); {'gpu' if self.gpu else 'cpu'}, "
            f"{_dtype_name(self.nbytes)}"
        )
        lines = [head] + [f"  {name:<17}{gb(v):>9}  {note}" for name, v, note in rows]
        lines.append(
            f"  {'batches':<17}{'':>9}  worst micro-batch {mb.rows} row(s) × {mb.length} tokens, "
            f"{mb.targets:,} target slots; {self.data_note}"
        )
        peak, alt = self.peak_bytes(ckpt), self.peak_bytes(not ckpt)
        lines.append(f"  {'peak':<17}{gb(peak):>9}  ({other} gradient checkpointing: {gb(alt)})")
        if self.budget.bytes is None:
            lines.append(f"  {'machine':<17}{'?':>9}  {self.budget.source}: not checked")
            return "\n".join(lines + self.notes)
        lines.append(f"  {'machine':<17}{gb(self.budget.bytes):>9}  {self.budget.source}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"  → {verdict}: peak + {MARGIN:.0%} = {gb(peak * (1 + MARGIN))} vs "
            f"{gb(self.budget.bytes)}"
        )
        return "\n".join(lines + self.notes)

    def _trainable_note(self) -> str:
        n = trainable_parameters(self.cfg, self.shape)
        opt = self.cfg.optim
        states = optimizer_states(self.cfg)
        kind = "float32" if self.cfg.finetune_type != "full" else _dtype_name(self.nbytes)
        return f"{count(n)} trainable {kind} values, gradients, {opt} state (×{states:g})"


def gb(n: float) -> str:
    """Bytes for people: ``2.47 GB``, ``310 MB``."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan(
    cfg: TrainConfig,
    examples: list | None = None,
    *,
    world: int = 1,
    model_dir: Path | None = None,
    budget: Budget | None = None,
    gpu: bool | None = None,
) -> Plan:
    """The memory plan of ``train(cfg)``; reads ``config.json`` only.

    ``examples`` (the encoded training examples) gives the run's real micro-batches; without them
    every micro-batch is assumed to be ``batch`` full ``--max-seq-length`` rows. ``budget`` and
    ``gpu`` default to this machine (the README's "what fits" table passes a Mac's).
    """
    from mlx_lora.hub import resolve_model

    if model_dir is None:
        model_dir = resolve_model(cfg.model, cfg.model_source, weights=False)
    shape = read_shape(model_dir)
    if examples is None:
        batches = [worst_case_batch(cfg)]
        note = (
            f"full --max-seq-length {cfg.max_seq_length} rows assumed (pass --data to plan "
            "for your data's batches)"
        )
    else:
        batches = run_batches(cfg, examples, world) or [worst_case_batch(cfg)]
        note = f"the worst of this run's {len(batches)} micro-batch shapes (from the data)"
    return Plan(
        cfg,
        shape,
        machine_budget() if budget is None else budget,
        batches,
        note,
        on_gpu() if gpu is None else gpu,
        model_dir,
    )


# ---------------------------------------------------------------- what to change


def _variants(cfg: TrainConfig, shape: ModelShape) -> list[tuple[int, float, TrainConfig]]:
    """(tier, relative time, config) of the changes worth trying. Tier 0 changes nothing in the
    result (checkpointing, the same batch split into more accumulation); 1 and 2 quantize the
    frozen base (8, then 4 bits); 3 truncates the data (shorter --max-seq-length)."""
    bs, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    splits = [k for k in range(1, bs + 1) if bs % k == 0]
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
            cache[key] = (
                [worst_case_batch(new)] if examples is None else run_batches(new, examples, world)
            )
        p = replace(base, cfg=new, batches=cache[key] or [worst_case_batch(new)])
        if p.fits:
            return new, p
    return None


def changes(old: TrainConfig, new: TrainConfig) -> str:
    """The flags that turn ``old`` into ``new``, as a user would type them."""
    flags = []
    if new.gradient_checkpointing != old.gradient_checkpointing:
        flags.append(
            "--gradient-checkpointing"
            if new.gradient_checkpointing
            else "--no-gradient-checkpointing"
        )
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


# ---------------------------------------------------------------- the command


@dataclass
class PlanConfig(TrainConfig):
    suggest: bool = opt(False, "also print the fastest configuration that fits, and its plan")


def examples_for(cfg: TrainConfig, model_dir: Path) -> list:
    """The training examples ``train`` would use (tokenizer only, no weights)."""
    from mlx_lora.data import load_dataset
    from mlx_lora.prompt import load_hf_tokenizer
    from mlx_lora.train import _split_data

    tokenizer = load_hf_tokenizer(model_dir)
    ds = load_dataset(
        Path(cfg.data),
        tokenizer,
        fmt=cfg.format,
        system_prompt=cfg.system_prompt,
        max_seq_length=cfg.max_seq_length,
    )
    return _split_data(cfg, ds, tokenizer)[0]


DESCRIPTION = """The memory plan of a training run: will it fit this machine? (train's flags)

Reads config.json only (no weights). With --data it lays out the run's real batches (tokenizer
only); without, it assumes full --max-seq-length rows. train prints the same plan and refuses a
run that does not fit (unless --force). MLX_LORA_MEMORY_LIMIT=8GB plans for a smaller machine."""

EPILOG = """examples:
  python -m mlx_lora.plan --model qwen/Qwen1.5-4B-Chat --quantize 4
  python -m mlx_lora.plan --model runs/base --data dataset/huanhuan.json --suggest
  MLX_LORA_MEMORY_LIMIT=8GB python -m mlx_lora.plan --model qwen/Qwen1.5-4B-Chat --suggest"""


def main(argv: list[str] | None = None) -> Plan:
    cfg = parse_config(PlanConfig, argv, "python -m mlx_lora.plan", DESCRIPTION, EPILOG)
    from mlx_lora.hub import resolve_model

    model_dir = resolve_model(cfg.model, cfg.model_source, weights=False)
    examples = None
    if "data" in given_fields(PlanConfig, argv, "python -m mlx_lora.plan", DESCRIPTION):
        examples = examples_for(cfg, model_dir)
    p = plan(cfg, examples, model_dir=model_dir)
    print(p.report())
    if cfg.suggest:
        found = suggest(cfg, examples, base=p)
        if found is None:
            print("\nsuggestion: nothing fits; use a smaller model or a bigger machine")
        else:
            new, q = found
            print(f"\nsuggestion (fastest that fits): {changes(cfg, new)}\n{q.report()}")
    return p


if __name__ == "__main__":
    from mlx_lora.cli import run

    sys.exit(run(main))
