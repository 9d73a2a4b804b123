"""Where a training step's time goes: milliseconds per step, part by part, on a real model shape.

The first ``--steps`` steps of one epoch over the first ``--examples`` huanhuan chats (batch 4,
LoRA r 8 / alpha 32 on the 7 linears, fp32), exactly as ``mlx_lora.train`` lays them out. Each
part is timed on that step's own batch, eagerly, after one warm-up call: attention and MLP
(forward + backward of layer 0's sublayer, times the number of layers), the rest of the blocks
(norms, residuals), the loss head (vocabulary projection + cross-entropy), the optimizer update
and host-side batching; ``whole step`` is the real step as train.py runs it, its first call's extra
time is compilation. Every figure is printed as wall time and as process CPU time (robust when
other processes share the cores; with ``OPENBLAS_NUM_THREADS=1`` it is the single-core work).

Runs against whichever ``mlx_lora`` is importable, so the same command profiles an older
checkout (``PYTHONPATH=/path/to/checkout``), which compiled the step per padded shape:

    python scripts/profile_train.py --model smollm2-135m|qwen2.5-0.5b|DIR [--checkpointing]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlx_lora.core.files import read_json
from mlx_lora.data.dataset import read_records

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO.parent / "shared" / "fixtures" / "qwen15-tokenizer"
HUANHUAN = REPO.parent / "shared" / "data" / "huanhuan.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float, float]:
    """Wall seconds of the first call, and the fastest later call's wall and CPU seconds (the
    minimum is what the work costs; interference from other processes only adds)."""
    import mlx.core as mx

    t0 = time.perf_counter()
    mx.eval(fn())
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        mx.eval(fn())
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return first, min(walls), min(cpus)


def grad_of(loss: Callable, module, x) -> Callable[[], object]:
    """Forward + backward of the scalar ``loss(x)`` for ``module``'s trainable parameters and x."""
    import mlx.core as mx

    def f(params, x):
        module.update(params)
        return loss(x)

    vg = mx.value_and_grad(f, argnums=(0, 1))
    return lambda: vg(module.trainable_parameters(), x)


def model_dir(spec: str) -> Path:
    """A folder, or a benchmark model (smollm2-135m: the real one from its GGUF; qwen2.5-0.5b:
    its shape, random weights) built once into ``~/.cache/mlx_lora-bench``, as
    scripts/bench_train.py builds them."""
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    from mlx_lora.testing.bench import prepare_model

    cache = Path.home() / ".cache" / "mlx_lora-bench"
    final = cache / spec
    if not (final / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = prepare_model(
                spec, Path(tmp), argparse.Namespace(bf16=False), qwen_tokenizer=QWEN_TOKENIZER
            )
            if Path(tmp) not in built.parents:  # already fp32 where it is (an import cache)
                return built
            built.rename(final)
    return final


def load(args) -> tuple:
    import mlx.core as mx

    from mlx_lora.data.dataset import load_dataset
    from mlx_lora.model.load import load_base
    from mlx_lora.model.lora import apply_lora

    model, tok, config = load_base(model_dir(args.model), dtype=mx.float32)
    recs = read_records(Path(args.data))[: args.examples]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(recs, f, ensure_ascii=False)
    examples = load_dataset(Path(f.name), tok, max_seq_length=2048).examples
    os.unlink(f.name)
    mx.random.seed(0)
    apply_lora(model, TARGETS, 8, 32.0, args.lora_dropout)
    model.train()
    return model, tok, config, examples


def step_parts(model, batch, layout, new: bool, checkpointing: bool) -> dict[str, Callable]:
    """Callables, one per part, for this batch (both code generations). The new code runs each
    row of the batch on its own lane, as training does."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora.train import loss as L
    from mlx_lora.train.loss import batch_arrays

    arrays = batch_arrays(batch)
    layer = model.model.layers[0]
    hidden = layer.post_attention_layernorm.weight.shape[0]
    if new:
        from mlx_lora.train import forward as F

        rows = [layout.row(r) for r in range(layout.rows)]
        shapes = [(1, row.length, hidden) for row in rows]
    else:
        shapes = [(*batch.inputs.shape, hidden)]
    xs = [mx.random.normal(shape) * 0.5 for shape in shapes]
    cots = [mx.random.normal(shape) for shape in shapes]
    mx.eval(xs, cots, *arrays)
    if new:
        masks = F.Masks()

        def lanes(fn):
            def loss(xs):
                total = mx.array(0.0)
                for r, (row, x, c) in enumerate(zip(rows, xs, cots, strict=True)):
                    with mx.stream(F.lane_stream(r)):
                        total = total + (fn(x, row) * c).sum()
                return total

            return loss

        attn = lanes(lambda z, row: F.attention(layer.self_attn, z, row, masks))
        mlp = lanes(lambda z, row: F.mlp(layer.mlp, z))
        block = lanes(lambda z, row: F.block(layer, z, row, masks))
        vg = nn.value_and_grad(
            model, lambda m, *a: L.loss_sum(m, *a, checkpoint=checkpointing, layout=layout)
        )
        whole = lambda: vg(model, *arrays)  # noqa: E731
        target_rows = layout.row_targets
    else:  # the seed generation: block-diagonal mask, mlx-lm's layers, compiled per shape
        mask = L.attention_mask(arrays[1])
        mx.eval(mask)
        attn = lambda xs: (layer.self_attn(xs[0], mask) * cots[0]).sum()  # noqa: E731
        mlp = lambda xs: (layer.mlp(xs[0]) * cots[0]).sum()  # noqa: E731
        block = lambda xs: (layer(xs[0], mask, None) * cots[0]).sum()  # noqa: E731
        vg = nn.value_and_grad(model, lambda m, *a: L.loss_sum(m, *a, checkpoint=checkpointing))
        state = [model.state, mx.random.state]
        compiled = mx.compile(lambda *a: vg(model, *a), inputs=state, outputs=state)
        whole = lambda: compiled(*arrays)  # noqa: E731
        target_rows = [(0, int(batch.weights.size))]
    hs = [mx.random.normal((t1 - t0, hidden)) * 0.5 for t0, t1 in target_rows]
    labels, weights = arrays[3], arrays[4]
    mx.eval(hs)

    def head(hs):
        total = mx.array(0.0)
        for r, (h, (t0, _)) in enumerate(zip(hs, target_rows, strict=True)):
            with mx.stream(F.lane_stream(r) if new else mx.default_stream(mx.cpu)):
                for s in range(0, h.shape[0], L.LOSS_CHUNK):
                    logits = L.project(model, h[s : s + L.LOSS_CHUNK]).astype(mx.float32)
                    a, b = t0 + s, t0 + min(s + L.LOSS_CHUNK, h.shape[0])
                    ce = _cross_entropy(logits, labels[a:b], new)
                    total = total + (ce * weights[a:b]).sum()
        return total

    return {
        "attention": grad_of(attn, layer.self_attn, xs),
        "mlp": grad_of(mlp, layer.mlp, xs),
        "block": grad_of(block, layer, xs),
        "loss head": lambda: mx.grad(head)(hs),
        "whole step": whole,
    }


def _cross_entropy(logits, labels, new: bool):
    import mlx.nn as nn

    if new:
        from mlx_lora.model import kernels

        return kernels.cross_entropy(logits, labels)
    return nn.losses.cross_entropy(logits, labels)


def epoch_shapes(examples, pad_id: int, batch_size: int) -> tuple[int, int]:
    """(steps, distinct batch shapes) over one epoch, as train.py lays batches out."""
    import math

    from mlx_lora.data.dataset import make_batch
    from mlx_lora.train.loop import step_examples

    steps = math.ceil(len(examples) / batch_size)
    shapes = set()
    for s in range(steps):
        ids = step_examples(s, len(examples), batch_size, steps, 0)
        chosen = [examples[j] for j in ids]
        new = importlib.util.find_spec("mlx_lora.train.forward") is not None
        b = make_batch(chosen, 2048, True, pad_id, pad_to=1) if new else make_batch(chosen, 2048)
        shapes.add((*b.inputs.shape, b.targets.shape[0]))
    return steps, len(shapes)


def profile(args) -> dict[str, list[tuple[float, float, float]]]:
    """Per part, one (first call, wall, cpu) triple per profiled step."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_lora.data.dataset import make_batch
    from mlx_lora.testing.bench import roofline
    from mlx_lora.train.loop import step_examples

    new = importlib.util.find_spec("mlx_lora.train.forward") is not None
    model, tok, config, examples = load(args)
    lanes_context = None
    if new:
        from mlx_lora.train.forward import Layout, cpu_lanes, keep_buffers

        keep_buffers()
        lanes_context = cpu_lanes(args.batch)
        lanes = lanes_context.__enter__()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    steps, n_shapes = epoch_shapes(examples, pad, args.batch)
    layers = len(model.model.layers)
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
    optimizer.init(model.trainable_parameters())
    out: dict[str, list] = {"_meta": [(steps, n_shapes, new)], "_tokens": []}
    for s in range(args.steps):
        ids = step_examples(s, len(examples), args.batch, steps, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        chosen = [examples[j] for j in ids]
        batch = (
            make_batch(chosen, 2048, True, pad, lanes=lanes) if new else make_batch(chosen, 2048)
        )
        layout = Layout.from_segments(batch.segments, batch.targets, batch.weights) if new else None
        out.setdefault("batching (host)", []).append(
            (0.0, time.perf_counter() - t0, time.process_time() - c0)
        )
        out["_tokens"].append((batch.n_tokens, int(batch.weights.sum()), batch.inputs.shape))
        parts = step_parts(model, batch, layout, new, args.checkpointing)
        for name, fn in parts.items():
            first, wall, cpu = timed(fn, args.repeat)
            scale = layers if name in ("attention", "mlp", "block") else 1
            out.setdefault(name, []).append((first * scale, wall * scale, cpu * scale))
        _, grads = parts["whole step"]()
        mx.eval(grads)
        out.setdefault("optimizer update", []).append(
            timed(lambda g=grads: (optimizer.update(model, g), model.parameters())[1], 1)
        )
        print(f"  profiled step {s + 1}/{args.steps}", file=sys.stderr, flush=True)
    if lanes_context is not None:
        lanes_context.__exit__(None, None, None)
    out["_roofline"] = [(roofline(config["hidden_size"], config["intermediate_size"]),)]
    return out


def report(args, res: dict) -> None:
    """The table: ms per step per part (mean over the profiled steps)."""
    steps, n_shapes, new = res["_meta"][0]
    mean = {
        k: [statistics.mean(c) * 1000 for c in zip(*v, strict=True)]
        for k, v in res.items()
        if k[0] != "_"
    }
    blocks = mean["block"]
    rest = [b - a - m for b, a, m in zip(blocks, mean["attention"], mean["mlp"], strict=True)]
    whole = mean["whole step"]
    compile_ms = whole[0] - whole[1]
    parts = (whole, mean["optimizer update"], mean["batching (host)"])
    total = [w + o + b for w, o, b in zip(*parts, strict=True)]
    other = [w - b - h for w, b, h in zip(whole, blocks, mean["loss head"], strict=True)]
    tokens = statistics.mean(t[0] for t in res["_tokens"])
    targets = statistics.mean(t[1] for t in res["_tokens"])
    load = os.getloadavg()[0]
    print(
        f"\n{'new' if new else 'old (seed generation)'} code; {args.model}; "
        f"gradient checkpointing {'on' if args.checkpointing else 'off'}; "
        f"{args.steps} steps of {steps}/epoch; {tokens:.0f} tokens, {targets:.0f} targets per "
        f"step; load average {load:.2f}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}"
    )
    rows = [
        ("attention (fwd+bwd, all layers)", mean["attention"]),
        ("MLP (fwd+bwd, all layers)", mean["mlp"]),
        ("norms + residuals (all layers)", rest),
        ("loss head (projection + CE)", mean["loss head"]),
        ("embedding, final norm, glue", other),
        ("whole fwd+bwd", whole),
        ("optimizer update", mean["optimizer update"]),
        ("batching (host)", mean["batching (host)"]),
        ("step total", total),
    ]
    print(f"{'part':34s} {'wall ms':>9s} {'cpu ms':>9s}")
    for name, (_, wall, cpu) in rows:
        print(f"{name:34s} {wall:9.0f} {cpu:9.0f}")
    print(
        f"compilation: {n_shapes} distinct batch shapes per epoch of {steps} steps; a step's first "
        f"call costs {compile_ms:+.0f} ms over a repeat "
        f"({'eager: no step compile' if new else 'compiled per shape'})"
    )
    cfg = read_json(model_dir(args.model) / "config.json")
    n = _param_count(cfg)
    roof = res["_roofline"][0][0]
    print(
        f"MFU: 4·N·tokens = {4 * n * tokens / 1e9:.0f} GFLOP per step over {total[1] / 1000:.2f} s "
        f"= {4 * n * tokens / (total[1] / 1000) / 1e9:.1f} GFLOP/s; roofline {roof / 1e9:.1f} "
        f"GFLOP/s; MFU {100 * 4 * n * tokens / (total[1] / 1000) / roof:.1f}%"
    )


def _param_count(cfg: dict) -> int:
    """Frozen weights: blocks' matrices + the output head (embedding counted once when tied)."""
    h, inter, layers, v = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    )
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * inter
    return layers * per_layer + v * h


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (fp32 weights), or smollm2-135m / qwen2.5-0.5b (built as "
        "scripts/bench_train.py builds them)",
    )
    p.add_argument("--data", default=str(HUANHUAN))
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="profile the first N steps of the epoch")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per part (fastest kept)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    args = p.parse_args()
    from mlx_lora.core import blas

    blas.maybe_relaunch()  # the system OpenBLAS, as every command (and bench_train) runs
    report(args, profile(args))


if __name__ == "__main__":
    main()
