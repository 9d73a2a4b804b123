"""The training forward (per-example attention) and its kernels reproduce mlx-lm's own numbers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_tiny_model

from mlx_lora.model import kernels
from mlx_lora.model.load import load_base
from mlx_lora.model.lora import DEFAULT_TARGETS, apply_lora
from mlx_lora.train import forward
from mlx_lora.train.loss import attention_mask

LENGTHS = [7, 12, 3, 9]  # examples packed into one row (+ 5 padding positions)


def _packed(lengths, pad=5):
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)])
    return seg[None].astype(np.int32)


def _qwen3_model():
    from mlx_lm.models import qwen3

    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=300,
        max_position_embeddings=512,
        rope_theta=10000.0,
        head_dim=16,
        tie_word_embeddings=True,
    )
    mx.random.seed(0)
    return qwen3.Model(args)


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def model(request, tmp_path_factory):
    if request.param == "qwen3":
        m = _qwen3_model()
    else:
        path = make_tiny_model(tmp_path_factory.mktemp("fw") / "m", arch=request.param)
        m = load_base(path, dtype=mx.float32)[0]
    mx.random.seed(1)
    apply_lora(m, DEFAULT_TARGETS, 4, 8.0, 0.0)
    for _, mod in m.named_modules():  # a nonzero adapter, so its path is exercised too
        if hasattr(mod, "lora_B"):
            mod.lora_B = mx.random.normal(mod.lora_B.shape) * 0.05
    return m


def test_every_trainable_architecture_takes_the_fast_path(model):
    assert forward.fast_path(model)


def test_layout_spans_from_segments():
    seg = np.array([[0, 0, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1], [0, -1, 1, 1, -1, -1]])
    lay = forward.Layout.from_segments(seg)
    assert lay.spans == ((0, 0, 2), (0, 2, 3), (1, 0, 3), (2, 0, 1), (2, 2, 2))
    assert (lay.rows, lay.length) == (3, 6)


def test_block_equals_the_models_own_layer_with_a_block_diagonal_mask(model):
    """Per-example attention (positions from 0 in every example) = mlx-lm's layer over the packed
    row with the block-diagonal mask (positions along the row: RoPE is relative)."""
    seg = _packed(LENGTHS)
    layer = model.model.layers[0]
    hidden = layer.post_attention_layernorm.weight.shape[0]
    x = mx.random.normal((1, seg.shape[1], hidden))
    ours = forward.block(layer, x, forward.Layout.from_segments(seg), forward.Masks())
    ref = layer(x, attention_mask(mx.array(seg)), None)
    n = sum(LENGTHS)  # the real tokens come first, padding after
    assert mx.abs(ours[:, :n] - ref[:, :n]).max().item() < 1e-4
    assert mx.abs(ours[:, n:]).max().item() > 0  # padding rows still flow (never targeted)


def test_each_example_alone_gives_the_same_hidden_states(model):
    """What the packed forward computes for an example is what the model computes for it alone."""
    seg = _packed(LENGTHS, pad=0)
    ids = mx.random.randint(3, 250, (1, seg.shape[1]))
    packed = forward.hidden_states(model, ids, forward.Layout.from_segments(seg))
    start = 0
    for n in LENGTHS:
        alone = model.model(ids[:, start : start + n])
        assert mx.abs(packed[:, start : start + n] - alone).max().item() < 1e-4
        start += n


def test_checkpointed_blocks_give_the_same_gradients(model):
    from mlx_lora.train.loss import loss_sum

    seg = _packed(LENGTHS)
    ids = mx.random.randint(3, 250, (1, seg.shape[1]))
    targets = mx.array(np.flatnonzero(seg[0] >= 0)[:-1].astype(np.int32))
    labels = mx.random.randint(3, 250, targets.shape)
    weights = mx.ones(targets.shape)
    arrays = (ids, mx.array(seg), targets, labels, weights)
    plain = nn.value_and_grad(model, lambda m: loss_sum(m, *arrays, checkpoint=False))(model)
    ckpt = nn.value_and_grad(model, lambda m: loss_sum(m, *arrays, checkpoint=True))(model)
    assert abs(plain[0].item() - ckpt[0].item()) < 1e-5
    from mlx.utils import tree_flatten

    a, b = dict(tree_flatten(plain[1])), dict(tree_flatten(ckpt[1]))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


# ---------------------------------------------------------------- kernels


def test_fast_exp_is_within_two_ulp_of_mx_exp():
    x = mx.linspace(-87.0, 87.0, 200_001)
    ref = mx.exp(x)
    assert (mx.abs(kernels.fast_exp(x) - ref) / ref).max().item() < 2.5e-7
    assert kernels.fast_exp(mx.array([-1000.0])).item() == 0.0


def _vjp_close(fast, ref, inputs, tol):
    cot = mx.random.normal(ref(*inputs).shape)
    (fo,), fg = mx.vjp(fast, inputs, [cot])
    (ro,), rg = mx.vjp(ref, inputs, [cot])
    assert mx.abs(fo - ro).max().item() < tol
    for a, b in zip(fg, rg, strict=True):
        assert mx.abs(a - b).max().item() < tol


def test_softmax_swiglu_cross_entropy_and_their_gradients():
    mx.random.seed(3)
    scores = mx.random.normal((2, 3, 17, 17)) * 4 + mx.triu(mx.full((17, 17), -mx.inf), k=1)
    _vjp_close(kernels.softmax, lambda s: mx.softmax(s, axis=-1, precise=True), [scores], 1e-6)
    gate, up = mx.random.normal((5, 33)) * 6, mx.random.normal((5, 33))
    _vjp_close(kernels.swiglu, lambda g, u: nn.silu(g) * u, [gate, up], 1e-5)
    logits, labels = mx.random.normal((9, 1000)) * 5, mx.random.randint(0, 1000, (9,))
    _vjp_close(
        lambda z: kernels.cross_entropy(z, labels),
        lambda z: nn.losses.cross_entropy(z, labels),
        [logits],
        1e-5,
    )


def test_dropout_keeps_one_minus_p_scaled_and_is_reproducible():
    x = mx.ones((300, 200))
    mx.random.seed(5)
    a = kernels.dropout(x, 0.25)
    mx.random.seed(5)
    b = kernels.dropout(x, 0.25)
    assert mx.array_equal(a, b)
    assert not mx.array_equal(b, kernels.dropout(x, 0.25))  # the next draw differs
    kept = (a > 0).astype(mx.float32)
    assert abs(kept.mean().item() - 0.75) < 0.01
    assert mx.allclose(a.max(), mx.array(1 / 0.75))
    # neighbouring elements and rows are not correlated
    assert abs((kept[:, 1:] == kept[:, :-1]).mean().item() - 0.625) < 0.01
    assert abs((kept[1:] == kept[:-1]).mean().item() - 0.625) < 0.01
    grad = mx.grad(lambda v: kernels.dropout(v, 0.25).sum())
    mx.random.seed(5)
    assert mx.array_equal(grad(x), a)  # the gradient flows through the kept elements only
    assert kernels.dropout(x, 0.0) is x


def test_lanes_pack_balanced_rows_and_give_the_same_loss(model, monkeypatch):
    """Rows run side by side (one CPU stream each): same loss and gradients as one packed row."""
    from mlx.utils import tree_flatten

    from mlx_lora.data.dataset import make_batch
    from mlx_lora.model.prompt import Encoded
    from mlx_lora.train.loss import batch_arrays, loss_sum

    rng = np.random.default_rng(0)
    exs = []
    for n in (30, 9, 21, 14, 5):
        ids = rng.integers(3, 250, n).tolist()
        exs.append(Encoded(ids, [j >= n // 3 for j in range(n)]))
    one = make_batch(exs, 256)
    two = make_batch(exs, 256, lanes=2)
    assert one.inputs.shape[0] == 1 and two.inputs.shape[0] == 2
    assert sorted((two.segments >= 0).sum(axis=1).tolist()) == [39, 40]  # 30+9 | 21+14+5
    monkeypatch.setattr(forward, "_cores", lambda: 2)

    def run(b):
        lay = forward.Layout.from_segments(b.segments, b.targets, b.weights)
        arrays = batch_arrays(b)
        return nn.value_and_grad(model, lambda m: loss_sum(m, *arrays, layout=lay))(model)

    with forward.cpu_lanes(4) as lanes:
        assert lanes == 2 and forward.lane_stream(0) != forward.lane_stream(1)
        (l2, g2) = run(two)
    (l1, g1) = run(one)
    assert forward.lanes() == 1  # restored
    assert abs(l1.item() - l2.item()) < 1e-4 * abs(l1.item())
    a, b = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


def test_row_targets_are_the_rows_slices_of_the_target_arrays():
    seg = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]])
    targets = np.array([0, 1, 3, 5, 6, 7, 0, 0])  # flat indices, row-major; 2 padding targets
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=np.float32)
    lay = forward.Layout.from_segments(seg, targets, weights)
    assert lay.row_targets == ((0, 3), (3, 6))
    assert lay.row(1) == forward.Layout(1, 4, ((0, 0, 4),))
