"""GRPO (Shao et al. 2024, DeepSeekMath): a group of sampled answers per prompt, scored by reward
functions, advantages normalised within the group, the clipped-ratio objective plus optional KL.

Sampling goes through the one generation function (:func:`mlx_lora.infer.generate.generate_answer`)
with the adapter on and dropout off; its seed is drawn from the step's RNG, so a resumed run samples
the same answers. The update then runs every completion of the micro-batch in one packed forward
(:func:`mlx_lora.train.loss.target_logps`). Per completion token t of answer i:

    ratio = π(t) / π_old(t)   (π_old = π detached: one update per generation, as TRL by default)
    ℓ = −min(ratio · A_i, clip(ratio, 1 − ε, 1 + ε) · A_i) + β · (exp(q − p) − (q − p) − 1)

with p = log π(t), q = log π_ref(t) (the k3 KL estimator; the reference is the adapter switched
off), A_i = (r_i − mean r) / (std r + 1e-4) over the group. ℓ is averaged over each answer's tokens,
then over answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_lora.data.dataset import make_batch
from mlx_lora.data.preference import PromptRow, Sequence
from mlx_lora.infer.generate import generate_answer
from mlx_lora.model.load import Loaded
from mlx_lora.model.meta import generation_config
from mlx_lora.train.forward import Layout
from mlx_lora.train.loss import batch_arrays, target_logps
from mlx_lora.train.preference import ReferenceSwap, owners
from mlx_lora.train.rewards import Reward


@dataclass
class GroupBatch:
    """A micro-batch of prompts; its token counts are known once the answers are sampled."""

    rows: list[PromptRow]
    max_len: int
    packing: bool
    pad_id: int
    layout: dict
    n_tokens: int = 0
    n_target_tokens: int = 0


@dataclass
class Settings:
    num_generations: int
    max_completion_length: int
    temperature: float
    epsilon: float
    beta: float
    system_prompt: str | None = None


@dataclass
class GRPOMethod:
    """The loop's view of a GRPO run: sample, score, update; TRL's metric names."""

    settings: Settings
    rewards: list[Reward]
    tokenizer: Any
    model_dir: Path
    config: dict
    path: str = "packed"
    checkpoint: bool = False
    eager: bool = True
    reference: ReferenceSwap = field(default_factory=ReferenceSwap)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def batch(self, rows: list, max_len: int, packing: bool, pad_id: int, **layout: Any):
        return GroupBatch(rows, max_len, packing, pad_id, layout)

    def units(self, b: GroupBatch) -> float:
        return float(len(b.rows) * self.settings.num_generations)

    def sample(self, model: nn.Module, row: PromptRow) -> tuple[list[Sequence], list[str]]:
        """``num_generations`` answers to one prompt, through the one generation function."""
        s = self.settings
        loaded = Loaded(model, self.tokenizer, self.model_dir, self.config, None, self._gen)
        seqs, texts = [], []
        for _ in range(s.num_generations):
            seed = int(mx.random.randint(0, 2**31 - 1, ()).item())
            stream = generate_answer(
                loaded, row.messages, system_prompt=s.system_prompt,
                max_tokens=s.max_completion_length, temperature=s.temperature, top_p=1.0,
                top_k=0, min_p=0.0, repetition_penalty=1.0, seed=seed,
            )  # fmt: skip
            for _ in stream:
                pass
            ids, comp = stream.prompt_ids, list(stream.answer.tokens)
            seqs.append(Sequence(ids + comp, [False] * len(ids) + [True] * len(comp), len(ids)))
            texts.append(stream.answer.text)
        return seqs, texts

    @property
    def _gen(self) -> dict:
        return generation_config(self.model_dir)

    def score(self, row: PromptRow, texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        """Summed rewards of one group, and each function's sum (for the log)."""
        total = np.zeros(len(texts))
        each = {}
        for r in self.rewards:
            vals = np.array(r([row.messages] * len(texts), texts, row.extras, row.record))
            total += vals
            each[f"rewards/{r.name}/mean"] = float(vals.sum())
        return total, each

    def rollout(self, model: nn.Module, b: GroupBatch) -> tuple[list[Sequence], np.ndarray]:
        model.eval()
        seqs, adv = [], []
        for row in b.rows:
            group, texts = self.sample(model, row)
            r, each = self.score(row, texts)
            adv.append((r - r.mean()) / (r.std() + 1e-4))
            seqs += group
            for k, v in {**each, "reward": r.sum(), "reward_std": r.std() * len(r)}.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            lengths = sum(len(q.ids) - q.prompt_len for q in group)
            self.sums["completion_length"] = self.sums.get("completion_length", 0.0) + lengths
        model.train()
        self.count += len(seqs)
        return seqs, np.concatenate(adv).astype(np.float32)

    def loss(self, model: nn.Module, pb: Any, owner: np.ndarray, adv: np.ndarray, ref: Any):
        arrays = batch_arrays(pb)
        layout = Layout.from_segments(pb.segments, pb.targets, pb.weights)
        tok = target_logps(
            model, *arrays[:4], owner.shape[1], self.path, self.checkpoint,
            layout if self.eager else None,
        )  # fmt: skip
        s = self.settings
        a = mx.array(adv) @ mx.array(owner)  # each token's answer's advantage
        ratio = mx.exp(tok - mx.stop_gradient(tok))
        clipped = mx.clip(ratio, 1 - s.epsilon, 1 + s.epsilon)
        per_tok = -mx.minimum(ratio * a, clipped * a)
        kl = mx.zeros_like(tok)
        if ref is not None:
            d = ref - tok
            kl = mx.exp(d) - d - 1
            per_tok = per_tok + s.beta * kl
        w = mx.array(owner / np.maximum(owner.sum(axis=1, keepdims=True), 1))
        return (w @ per_tok).sum(), mx.stop_gradient((w @ kl).sum())

    def step(self, model: nn.Module, b: GroupBatch) -> tuple[mx.array, Any]:
        seqs, adv = self.rollout(model, b)
        kept = [q for q in seqs if any(q.mask[1 : b.max_len])]
        if len(kept) < len(seqs):  # an empty answer (or one past --max-seq-length) cannot learn
            adv = np.array(
                [a for a, q in zip(adv, seqs, strict=True) if any(q.mask[1 : b.max_len])]
            )
        seqs = [Sequence(q.ids[: b.max_len], q.mask[: b.max_len], q.prompt_len) for q in kept]
        if not seqs:
            return mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
        pb = make_batch(seqs, b.max_len, b.packing, b.pad_id, **b.layout)
        owner = owners(seqs, pb, b.max_len, b.packing, b.layout.get("pad_to", 32),
                       b.layout.get("lanes", 1))  # fmt: skip
        b.n_tokens, b.n_target_tokens = pb.n_tokens, pb.n_target_tokens
        ref = None
        if self.settings.beta > 0:
            arrays = batch_arrays(pb)
            ref = self.reference.logps(
                model, lambda m: target_logps(m, *arrays[:4], owner.shape[1], self.path)
            )
        vg = nn.value_and_grad(model, lambda m: self.loss(m, pb, owner, adv, ref))
        (loss, kl), grads = vg(model)
        mx.eval(loss, kl)
        self.sums["kl"] = self.sums.get("kl", 0.0) + kl.item()
        return loss, grads

    def pop_metrics(self) -> dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out

    def evaluate(self, model: nn.Module, rows: list, bs: int, *_: Any) -> tuple[float, dict]:
        """Minus the mean reward of sampled groups on the validation prompts (lower is better,
        like a loss, so early stopping keeps the best adapter)."""
        saved = (self.sums, self.count)
        self.sums, self.count = {}, 0
        for row in rows:
            _, texts = self.sample(model, row)
            r, each = self.score(row, texts)
            for k, v in {**each, "reward": r.sum()}.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.count += len(texts)
        model.train()
        metrics = self.pop_metrics()
        self.sums, self.count = saved
        return -metrics["reward"], metrics
