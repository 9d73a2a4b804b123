"""What quantization cost, measured: perplexity and top-1 agreement on held-out text.

``ollama create -q`` reports nothing about what a smaller file lost. Here every quantized export is
scored on the same token ids as its full-precision reference: the run's validation split (rebuilt
from what training recorded in ``adapter_config.json``: data file, ``--val-split``, seed), or
``--eval-data FILE``, or — when neither exists — a few built-in texts, which the table says.
Perplexity is ``exp`` of the mean negative log-likelihood over the positions training scores
(assistant turns in chat data, every token of plain text), as ``eval_loss`` does; top-1 agreement
is over every position of the texts. GGUFs are scored through llama.cpp (the quantized file and the
f16/f32 one it was made from), MLX folders through MLX; both against the full-precision MLX model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.units import human_bytes
from mlx_lora.data.dataset import encode_plain, load_dataset
from mlx_lora.eval.compare import _held_out
from mlx_lora.gguf.llamacpp import open_llama, token_scores
from mlx_lora.gguf.quant import bits_per_weight
from mlx_lora.model.prompt import Encoded

MAX_TEXTS = 32
MAX_TOKENS = 256
BUILTIN_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She liked to play in the park.",
    "The quick brown fox jumps over the lazy dog, and the dog did not mind at all.",
    "小主，今日天朗气清，不如去御花园走走，看看新开的海棠。",
    "def square(x):\n    return x * x\n\nprint(square(12))\n",
)


@dataclass
class EvalSet:
    """Held-out token sequences (ids + which positions are scored) and where they came from."""

    source: str
    examples: list[Encoded]

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def scored(self) -> int:
        return sum(sum(e.mask[1:]) for e in self.examples)

    def describe(self) -> str:
        n = len(self.examples)
        return f"{self.source} ({n} texts, {self.tokens} tokens, {self.scored} scored)"


def _pick(examples: list[Encoded], max_texts: int, max_tokens: int) -> list[Encoded]:
    """Evenly spread texts, each cut to ``max_tokens``; texts left without a target are dropped."""
    if len(examples) > max_texts:
        idx = np.unique(np.linspace(0, len(examples) - 1, max_texts).round().astype(int))
        examples = [examples[i] for i in idx]
    cut = [Encoded(e.ids[:max_tokens], e.mask[:max_tokens]) for e in examples]
    return [e for e in cut if len(e.ids) > 1 and any(e.mask[1:])]


def eval_set(
    tokenizer: Any,
    *,
    adapter: Any = None,
    eval_data: Path | None = None,
    system_prompt: str | None = None,
    max_texts: int = MAX_TEXTS,
    max_tokens: int = MAX_TOKENS,
) -> EvalSet:
    """``--eval-data``, else the run's validation split, else the built-in texts. With a training
    run, the held-out texts are encoded as that run encoded them (:mod:`mlx_lora.eval.compare`'s
    rule)."""

    if eval_data is not None and not Path(eval_data).is_file():
        raise MlxLoraError(f"--eval-data {eval_data} does not exist; pass a dataset file")
    found: tuple[str, list[Encoded]] | None = None
    if adapter is not None:
        try:
            source, examples, _ = _held_out(
                adapter, str(eval_data) if eval_data else None, tokenizer
            )
            found = (source, examples)
        except MlxLoraError:  # the run recorded no split (and no --eval-data was given)
            found = None
    elif eval_data is not None:
        ds = load_dataset(Path(eval_data), tokenizer, system_prompt=system_prompt)
        found = (str(eval_data), ds.examples)
    if found is None:
        found = (
            "built-in texts (no validation split recorded; pass --eval-data)",
            [encode_plain(tokenizer, t) for t in BUILTIN_TEXTS],
        )
    examples = _pick(found[1], max_texts, max_tokens)
    if not examples:
        raise MlxLoraError(f"{found[0]}: no text with a scored token; pass another --eval-data")
    return EvalSet(found[0], examples)


# ------------------------------------------------------------------------------ scoring


@dataclass
class Scores:
    """One model on one eval set: summed negative log-likelihood and top-1 ids per text."""

    nll: float = 0.0
    scored: int = 0
    top1: list[np.ndarray] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored) if self.scored else float("nan")

    def add(self, logprobs: np.ndarray, mask: list[bool], top1: np.ndarray) -> None:
        m = np.asarray(mask[1:], dtype=bool)
        self.nll -= float(np.asarray(logprobs, dtype=np.float64)[m].sum())
        self.scored += int(m.sum())
        self.top1.append(np.asarray(top1))

    def agreement(self, other: Scores) -> float:
        same = sum(int((a == b).sum()) for a, b in zip(self.top1, other.top1, strict=True))
        return same / max(1, sum(len(a) for a in self.top1))


def mlx_scores(model: Any, evals: EvalSet) -> Scores:
    """Score an MLX model (in whatever dtype it was loaded) without materialising full logits."""
    import mlx.core as mx

    out = Scores()
    for e in evals.examples:
        logits = model(mx.array([e.ids]))[0].astype(mx.float32)
        targets = mx.array(e.ids[1:])
        head = logits[:-1]
        lp = mx.take_along_axis(head, targets[:, None], axis=-1)[:, 0]
        lp = lp - mx.logsumexp(head, axis=-1)
        out.add(np.array(lp), e.mask, np.array(mx.argmax(logits, axis=-1)))
    return out


def llama_scores(gguf_path: Path, evals: EvalSet, lora_gguf: Path | None = None) -> Scores:
    """Score a GGUF (optionally with a GGUF LoRA adapter) through llama.cpp."""

    n_ctx = max(len(e.ids) for e in evals.examples) + 8
    llm = open_llama(Path(gguf_path), n_ctx=n_ctx, lora_path=lora_gguf)
    out = Scores()
    for e in evals.examples:
        lp, top1 = token_scores(llm, e.ids)
        out.add(lp, e.mask, top1)
    del llm
    return out


# ------------------------------------------------------------------------------- the table


@dataclass
class Row:
    label: str
    kind: str  # the GGUF type, or "mlx 4-bit", "fp32"
    scores: Scores
    size: int | None = None  # bytes on disk
    bits_per_weight: float | None = None
    reference: bool = False

    def values(self, ref: Scores, mlx: Scores | None) -> dict[str, Any]:
        return {
            "label": self.label,
            "type": self.kind,
            "size_bytes": self.size,
            "bits_per_weight": self.bits_per_weight,
            "perplexity": round(self.scores.perplexity, 4),
            "perplexity_vs_reference": round(self.scores.perplexity / ref.perplexity - 1, 5),
            "top1_agreement_mlx": None if mlx is None else round(self.scores.agreement(mlx), 5),
            "reference": self.reference,
        }


@dataclass
class Quality:
    """The quality section of a verify report: the quantized model, its reference, and MLX."""

    evals: EvalSet
    rows: list[Row]
    mlx: Scores | None  # the full-precision MLX model, the top-1 referee
    mlx_label: str = "MLX full precision"

    @property
    def reference(self) -> Scores:
        return next(r.scores for r in self.rows if r.reference)

    def table(self) -> str:
        lines = [
            f"  quality on {self.evals.describe()}",
            f"    {'model':<28} {'type':<10} {'size':>9} {'bits/w':>7} {'perplexity':>11} "
            f"{'vs ref':>8} {'top-1 = MLX':>11}",
        ]
        for r in self.rows:
            v = r.values(self.reference, self.mlx)
            size = human_bytes(r.size) if r.size else "-"
            bpw = f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "-"
            delta = "—" if r.reference else f"{100 * v['perplexity_vs_reference']:+.2f}%"
            agree = "-" if self.mlx is None else f"{100 * v['top1_agreement_mlx']:.1f}%"
            lines.append(
                f"    {r.label[:28]:<28} {r.kind:<10} {size:>9} {bpw:>7} "
                f"{r.scores.perplexity:>11.4g} {delta:>8} {agree:>11}"
            )
        if self.mlx is not None:
            lines.append(
                f"    {self.mlx_label:<28} {'':<10} {'':>9} {'':>7} {self.mlx.perplexity:>11.4g}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "eval_source": self.evals.source,
            "texts": len(self.evals.examples),
            "tokens": self.evals.tokens,
            "scored_tokens": self.evals.scored,
            "rows": [r.values(self.reference, self.mlx) for r in self.rows],
            "mlx_perplexity": None if self.mlx is None else round(self.mlx.perplexity, 4),
        }


def gguf_row(label: str, kind: str, path: Path, scores: Scores, reference: bool = False) -> Row:

    size = Path(path).stat().st_size
    return Row(label, kind, scores, size, bits_per_weight(path), reference)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
