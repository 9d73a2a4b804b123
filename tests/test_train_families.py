"""Training every architecture mlx-lm loads: the packed path and the general path compute the
loss of mlx-lm's own plain forward, train, chat and fuse, on tiny random models of 11 families."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import SAMPLE_DATA, make_tiny_model
from mlx.utils import tree_flatten

from mlx_lora.config import TrainConfig
from mlx_lora.data.dataset import load_dataset, make_batch
from mlx_lora.model.load import load_base, load_for_inference
from mlx_lora.model.lora import DEFAULT_TARGETS, apply_lora, linear_paths
from mlx_lora.train.loop import train
from mlx_lora.train.loss import (
    checkpoint_layers,
    general_loss_sum,
    loss_sum,
    reference_loss_sum,
    training_path,
)

ARCHS = [
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "smollm",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "starcoder2",
]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("arch") / request.param
    return request.param, make_tiny_model(out, arch=request.param, init="fan_in")


def _lora(model: nn.Module, seed: int = 3) -> None:
    apply_lora(model, DEFAULT_TARGETS, 4, 8, 0.0)
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            m.lora_B = mx.array(rng.normal(0, 0.05, m.lora_B.shape).astype(np.float32))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_our_loss_is_mlx_lms_loss(arch_model, checkpoint):
    """The loss and gradients of the path training takes equal mlx-lm's plain forward's."""
    arch, path_dir = arch_model
    model, tok, config = load_base(path_dir, dtype=mx.float32)
    _lora(model)
    exs = load_dataset(SAMPLE_DATA, tok, max_seq_length=96).examples[:5]
    path = training_path(config["model_type"])
    packed = ("qwen2", "qwen3", "llama", "mistral", "smollm", "phi3", "gemma2", "gemma3_text")
    assert path == ("packed" if arch in packed else "general")
    if path == "general" and checkpoint:
        checkpoint_layers(model)

    def ours(m):
        b = make_batch(exs, 96, packing=path == "packed")
        arrays = [mx.array(a) for a in (b.inputs, b.segments, b.targets, b.labels, b.weights)]
        if path == "packed":
            return loss_sum(m, *arrays, checkpoint=checkpoint, chunk=16)
        return general_loss_sum(m, *arrays)

    def plain(m):
        total = mx.array(0.0)
        for e in exs:
            total = total + reference_loss_sum(
                m, mx.array([e.ids]), mx.array([e.mask], dtype=mx.float32)
            )
        return total

    lo, go = nn.value_and_grad(model, ours)(model)
    lr, gr = nn.value_and_grad(model, plain)(model)
    assert abs(lo.item() - lr.item()) <= 1e-4 * max(1.0, abs(lr.item())), (lo.item(), lr.item())
    go, gr = dict(tree_flatten(go)), dict(tree_flatten(gr))
    assert max(mx.abs(go[k] - gr[k]).max().item() for k in gr) <= 1e-4
    assert max(mx.abs(g).max().item() for g in gr.values()) > 1e-3


def test_trains_chats_and_fuses(arch_model, tmp_path, capsys):
    from mlx_lora.export.fuse import fuse
    from mlx_lora.infer.generate import complete

    arch, path_dir = arch_model
    cfg = TrainConfig(
        model=str(path_dir),
        data=str(SAMPLE_DATA),
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        save_steps=100,
        logging_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        lora_dropout=0.0,
        max_seq_length=128,
        plot=False,
    )
    res = train(cfg, progress=False)
    assert "path: " in capsys.readouterr().out
    import json

    state = json.loads((res.output_dir / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0], losses
    loaded = load_for_inference(None, res.output_dir)
    answer = complete(loaded, [{"role": "user", "content": "你是谁？"}], max_tokens=6)
    assert answer.completion_tokens > 0
    x = mx.array([[1, 5, 9, 12, 30, 7]])
    fused = fuse(None, res.output_dir, tmp_path / "fused", dtype="float32")
    got = load_for_inference(str(fused), dtype="float32").model(x)
    assert mx.abs(got - loaded.model(x)).max().item() < 1e-4


def test_fused_and_renamed_modules_take_the_seed_targets(tmp_path):
    """Phi-3 fuses q/k/v and gate/up; StarCoder2's MLP is c_fc → c_proj: the seed's targets
    (q,k,v,o,gate,up,down) adapt every linear there is."""
    for arch, want in (
        ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
        ("starcoder2", {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}),
    ):
        model, _, _ = load_base(make_tiny_model(tmp_path / arch, arch=arch))
        wrapped = apply_lora(model, DEFAULT_TARGETS, 4, 8)
        assert {p.rsplit(".", 1)[-1] for p in wrapped} == want
        assert len(wrapped) == len(linear_paths(model))
