"""Preference objectives (DPO and its IPO/hinge variants, ORPO, SimPO, KTO) on the packed forward.

A micro-batch packs every sequence it needs (chosen and rejected of each pair; KTO's completions
and its mismatched prompt/completion rows for the KL estimate) into one set of rows, so one forward
gives every sequence's log-probability: per target token from :func:`mlx_lora.train.loss
.target_logps`, summed per sequence by a constant owner matrix. The reference log-probs come from
the same model with the LoRA layers switched off (:func:`mlx_lora.model.lora.set_active`; no second
copy of the weights) or with ``--ref-adapter``'s tensors swapped in, once per micro-batch and
without a gradient.

Formulas (the papers'; hyper-parameters under TRL's names, losses averaged over pairs):

- DPO (Rafailov et al. 2023), z = (log π(c) − log π(r)) − (log π_ref(c) − log π_ref(r)):
  sigmoid −(1−ε)·log σ(βz) − ε·log σ(−βz) (ε = ``label_smoothing``, cDPO); hinge max(0, 1 − βz)
  (SLiC); ipo (Azar et al. 2023) (z − 1/(2β))² with length-averaged log-probs, as TRL computes it.
- ORPO (Hong et al. 2024): −ā(c) − β·log σ(log odds(c) − log odds(r)), ā = mean token log-prob,
  log odds(y) = ā(y) − log(1 − exp ā(y)) (:func:`log1mexp`: finite as ā → 0).
- SimPO (Meng et al. 2024): −(1−ε)·log σ(β(ā(c) − ā(r)) − γ) − ε·log σ(−(…)), γ = ``simpo_gamma``.
- KTO (Ethayarajh et al. 2024): r = log π(y) − log π_ref(y), z₀ = max(0, mean over the micro-batch
  of the mismatched rows' r) without gradient; desirable λ_D(1 − σ(β(r − z₀))), undesirable
  λ_U(1 − σ(β(z₀ − r))).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.config import NEEDS_REFERENCE
from mlx_lora.data.dataset import Batch, make_batch, pack_rows
from mlx_lora.data.preference import Pair, Sequence, Unpaired
from mlx_lora.model.lora import set_active
from mlx_lora.train.forward import Layout
from mlx_lora.train.loss import batch_arrays, target_logps

PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "kto")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.0}


@dataclass(frozen=True)
class Objective:
    """Which loss, and its hyper-parameters (TRL's names)."""

    method: str
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def averaged(self) -> bool:
        """Whether the loss reads length-averaged log-probs (ORPO, SimPO, IPO)."""
        return self.method in ("orpo", "simpo") or self.loss_type == "ipo"


LOG1MEXP_CLAMP = -1e-7  # mean log-prob ā ≤ this: at ā = 0 log(1 − e^ā) is −inf


def log1mexp(a: mx.array) -> mx.array:
    """log(1 − exp(a)) for a ≤ 0, finite everywhere: a is clamped to ≤ −1e-7 (ā → 0 when the
    model is certain of every token: log(1 − e^0) = −inf, NaN gradients), and evaluated as
    log(−expm1(a)) near 0 and log1p(−exp(a)) below −ln 2 (Mächler 2012), exact in float32."""
    a = mx.minimum(a, LOG1MEXP_CLAMP)
    return mx.where(a > -0.6931472, mx.log(-mx.expm1(a)), mx.log1p(-mx.exp(a)))


def _smoothed(x: mx.array, eps: float) -> mx.array:
    return -(1 - eps) * nn.log_sigmoid(x) - eps * nn.log_sigmoid(-x)


def pair_loss(
    o: Objective, pc: mx.array, pr: mx.array, rc: mx.array | None, rr: mx.array | None,
    nc: mx.array, nr: mx.array,
) -> tuple[mx.array, dict[str, mx.array]]:  # fmt: skip
    """Summed loss of pairs from summed log-probs ``pc``/``pr`` (policy), ``rc``/``rr``
    (reference) and token counts ``nc``/``nr``; and TRL's metrics, summed over the pairs."""
    ac, ar = pc / nc, pr / nr
    if o.method == "orpo":
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = nn.log_sigmoid(log_odds)
        losses = -ac - o.beta * ratio
        wc, wr = o.beta * ac, o.beta * ar
        extra = {
            "nll_loss": (-ac).sum(),
            "log_odds_ratio": ratio.sum(),
            "log_odds_chosen": log_odds.sum(),
        }
    elif o.method == "simpo":
        losses = _smoothed(o.beta * (ac - ar) - o.simpo_gamma, o.label_smoothing)
        wc, wr, extra = o.beta * ac, o.beta * ar, {}
    else:
        c, r = (ac, ar) if o.averaged else (pc, pr)
        ref_c, ref_r = (rc / nc, rr / nr) if o.averaged else (rc, rr)
        z = (c - r) - (ref_c - ref_r)
        if o.loss_type == "ipo":
            losses = (z - 1 / (2 * o.beta)) ** 2
        elif o.loss_type == "hinge":
            losses = nn.relu(1 - o.beta * z)
        else:
            losses = _smoothed(o.beta * z, o.label_smoothing)
        wc, wr, extra = o.beta * (pc - rc), o.beta * (pr - rr), {}
    wc, wr = mx.stop_gradient(wc), mx.stop_gradient(wr)
    metrics = {
        "rewards/chosen": wc.sum(),
        "rewards/rejected": wr.sum(),
        "rewards/margins": (wc - wr).sum(),
        "rewards/accuracies": (wc > wr).astype(mx.float32).sum(),
        "logps/chosen": mx.stop_gradient(pc).sum(),
        "logps/rejected": mx.stop_gradient(pr).sum(),
        **{k: mx.stop_gradient(v) for k, v in extra.items()},
    }
    return losses.sum(), metrics


def kto_loss(
    o: Objective, p: mx.array, ref: mx.array, kl_p: mx.array, kl_ref: mx.array, label: mx.array
) -> tuple[mx.array, dict[str, mx.array]]:
    """Summed KTO loss of completions (summed log-probs ``p``, ``ref``; ``label`` 1 = desirable)
    with the KL estimate from the mismatched rows ``kl_p``/``kl_ref``; TRL's metrics (sums)."""
    z0 = mx.stop_gradient(mx.maximum(mx.mean(kl_p - kl_ref), 0.0))
    r = p - ref
    good = o.desirable_weight * (1 - mx.sigmoid(o.beta * (r - z0)))
    bad = o.undesirable_weight * (1 - mx.sigmoid(o.beta * (z0 - r)))
    losses = mx.where(label > 0, good, bad)
    w = mx.stop_gradient(o.beta * r)
    lab = label.astype(mx.float32)
    metrics = {
        "rewards/chosen": (w * lab).sum(),
        "rewards/rejected": (w * (1 - lab)).sum(),
        "logps/chosen": (mx.stop_gradient(p) * lab).sum(),
        "logps/rejected": (mx.stop_gradient(p) * (1 - lab)).sum(),
        "kl": z0 * label.size,
    }
    return losses.sum(), metrics


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class PrefBatch:
    """Every sequence of a micro-batch in one packed :class:`Batch`, and which sequence owns each
    target token (``owner`` [sequences, targets]: 1 where it does)."""

    batch: Batch
    owner: np.ndarray
    items: int  # pairs or completions: the unit the loss is averaged over
    labels: np.ndarray | None = None  # KTO: 1 = desirable
    n_real: int = 0

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_target_tokens(self) -> int:
        return self.batch.n_target_tokens


def _mismatched(seqs: list[Sequence], max_len: int) -> list[Sequence]:
    """KTO's KL rows: prompt i with the completion of item i − 1 (itself when alone)."""
    out = []
    for i, s in enumerate(seqs):
        o = seqs[i - 1]
        ids = (s.ids[: s.prompt_len] + o.ids[o.prompt_len :])[:max_len]
        mask = ([False] * s.prompt_len + o.mask[o.prompt_len :])[:max_len]
        out.append(Sequence(ids, mask, s.prompt_len))
    return out


def owners(seqs: list[Any], batch: Batch, max_len: int, packing: bool, pad_to: int, lanes: int):
    """Owner matrix of :class:`PrefBatch` from the layout :func:`make_batch` chose."""
    rows, length = pack_rows([len(s.ids) for s in seqs], max_len, packing, pad_to, lanes)
    n_real = int((batch.weights > 0).sum())
    owner = np.zeros((len(seqs), n_real), dtype=np.float32)
    for t, flat in enumerate(batch.targets[:n_real]):
        r, pos = divmod(int(flat), batch.inputs.shape[1])
        owner[rows[r][batch.segments[r, pos]], t] = 1.0
    return owner


def pref_batch(
    items: list[Pair | Unpaired], max_len: int, packing: bool, pad_id: int,
    pad_to: int = 32, lanes: int = 1,
) -> PrefBatch:  # fmt: skip
    """Pairs: chosen then rejected sequences; KTO rows: completions then their KL rows."""
    labels = None
    if items and isinstance(items[0], Pair):
        seqs = [p.chosen for p in items] + [p.rejected for p in items]
    else:
        comps = [u.seq for u in items]
        seqs = comps + _mismatched(comps, max_len)
        labels = np.array([u.label for u in items], dtype=np.float32)
    b = make_batch(seqs, max_len, packing, pad_id, pad_to, lanes)
    owner = owners(seqs, b, max_len, packing, pad_to, lanes)
    return PrefBatch(b, owner, len(items), labels, owner.shape[1])


# ---------------------------------------------------------------- the step


@dataclass
class ReferenceSwap:
    """The reference policy as LoRA tensors swapped in (``--ref-adapter``), or the adapter off."""

    tensors: dict[str, mx.array] | None = None

    def logps(self, model: nn.Module, fn: Any) -> mx.array:
        was_training = model.training
        model.eval()
        if self.tensors is None:
            set_active(model, False)
            try:
                out = fn(model)
            finally:
                set_active(model, True)
        else:
            mine = dict(_lora_params(model))
            model.load_weights(list(self.tensors.items()), strict=False)
            try:
                out = fn(model)
            finally:
                model.load_weights(list(mine.items()), strict=False)
        mx.eval(out)
        model.train(was_training)
        return mx.stop_gradient(out)


def _lora_params(model: nn.Module) -> list[tuple[str, mx.array]]:
    return list(tree_flatten(model.trainable_parameters()))


@dataclass
class PreferenceMethod:
    """What the loop needs of a preference run: batches, units, loss + gradient, metrics."""

    objective: Objective
    path: str = "packed"
    checkpoint: bool = False
    eager: bool = True
    reference: ReferenceSwap = field(default_factory=ReferenceSwap)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    kto_counts: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def batch(self, items: list, max_len: int, packing: bool, pad_id: int, **layout: Any):
        return pref_batch(items, max_len, packing, pad_id, **layout)

    def units(self, b: PrefBatch) -> float:
        return float(b.items)

    def _seq_logps(self, model: nn.Module, b: PrefBatch, arrays: tuple) -> tuple[mx.array, ...]:
        layout = Layout.from_segments(b.batch.segments, b.batch.targets, b.batch.weights)
        tok = target_logps(
            model, *arrays[:4], b.n_real, self.path, self.checkpoint, layout if self.eager else None
        )
        return mx.array(b.owner) @ tok

    def loss(self, model: nn.Module, b: PrefBatch, ref: mx.array | None):
        """Summed loss and metric sums of a batch given the reference's per-sequence log-probs."""
        arrays = batch_arrays(b.batch)
        seq = self._seq_logps(model, b, arrays)
        counts = mx.array(b.owner.sum(axis=1))
        n, o = b.items, self.objective
        if o.method == "kto":
            return kto_loss(o, seq[:n], ref[:n], seq[n:], ref[n:], mx.array(b.labels))
        rc, rr = (ref[:n], ref[n:]) if ref is not None else (None, None)
        return pair_loss(o, seq[:n], seq[n:], rc, rr, counts[:n], counts[n:])

    def reference_logps(self, model: nn.Module, b: PrefBatch) -> mx.array | None:
        if self.objective.method not in NEEDS_REFERENCE:
            return None
        arrays = batch_arrays(b.batch)
        return self.reference.logps(model, lambda m: self._seq_logps(m, b, arrays))

    def step(self, model: nn.Module, b: PrefBatch) -> tuple[mx.array, Any]:
        ref = self.reference_logps(model, b)
        vg = nn.value_and_grad(model, lambda m: self.loss(m, b, ref))
        (loss, metrics), grads = vg(model)
        mx.eval(loss, metrics)
        self.add(metrics, b)
        return loss, grads

    def add(self, metrics: dict[str, mx.array], b: PrefBatch) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.item())
        self.count += b.items
        if b.labels is not None:
            self.kto_counts[0] += float(b.labels.sum())
            self.kto_counts[1] += float(len(b.labels) - b.labels.sum())

    def pop_metrics(self) -> dict[str, float]:
        """Means since the last call (KTO: chosen/rejected over their own rows)."""
        out = {}
        for k, v in self.sums.items():
            den = self.count
            if self.objective.method == "kto" and k.endswith("chosen"):
                den = self.kto_counts[0]
            elif self.objective.method == "kto" and k.endswith("rejected"):
                den = self.kto_counts[1]
            out[k] = v / max(den, 1)
        self.sums, self.count, self.kto_counts = {}, 0, [0.0, 0.0]
        return out

    def evaluate(self, model: nn.Module, items: list, bs: int, max_len: int, packing: bool,
                 pad_id: int) -> tuple[float, dict[str, float]]:  # fmt: skip
        """Mean loss and metrics over ``items`` (no dropout, no gradient)."""
        model.eval()
        total, saved = 0.0, (self.sums, self.count, self.kto_counts)
        self.sums, self.count, self.kto_counts = {}, 0, [0.0, 0.0]
        for i in range(0, len(items), bs):
            b = self.batch(items[i : i + bs], max_len, packing, pad_id, pad_to=1)
            loss, metrics = self.loss(model, b, self.reference_logps(model, b))
            total += loss.item()
            self.add(metrics, b)
        n = self.count
        metrics = self.pop_metrics()
        self.sums, self.count, self.kto_counts = saved
        model.train()
        return total / max(n, 1), metrics
