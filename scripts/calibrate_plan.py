"""Fit the memory plan's activation multipliers (``mlx_lora.plan.footprint.COEF``) to measured
peaks.

Each case trains a tiny model (``mlx_lora.testing.tiny_model``: the fast, packed and general
paths of ``mlx_lora.train.loss``) for two steps in a fresh process, on synthetic examples of chosen
lengths (so the micro-batch is known exactly), and records MLX's counters: the load peak, the
memory held after setup (weights, LoRA, optimizer state) and the step peak. The plan's terms of
the same micro-batch (``footprint.activation_terms``) are written next to them; ``--fit`` then
solves, per path and checkpointing setting, for the non-negative multipliers that minimise the
relative error of (step peak − held − gradients).

    python scripts/calibrate_plan.py --work /tmp/calib            # measure (JSON lines)
    python scripts/calibrate_plan.py --work /tmp/calib --fit      # fit COEF from them
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import astuple
from pathlib import Path

from mlx_lora.testing import SAMPLE_DATA
from mlx_lora.testing.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
QWEN_DIR = REPO.parent / "shared" / "fixtures" / "qwen15-tokenizer"

FEW_TERMS = ("blocks", "workspace", "logits")

# model name → make_tiny_model arguments
MODELS = {
    "q256": {
        "hidden_size": 256,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "intermediate_size": 704,
        "vocab_size": 8192,
    },
    "q512": {
        "hidden_size": 512,
        "layers": 6,
        "heads": 8,
        "kv_heads": 4,
        "intermediate_size": 1408,
        "vocab_size": 32768,
    },
    "l384": {
        "arch": "llama",
        "hidden_size": 384,
        "layers": 3,
        "heads": 6,
        "kv_heads": 2,
        "intermediate_size": 1024,
        "vocab_size": 16384,
    },
    "qw3": {
        "arch": "qwen3",
        "hidden_size": 256,
        "layers": 3,
        "heads": 4,
        "kv_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 8192,
    },
    "phi3": {
        "arch": "phi3",
        "hidden_size": 256,
        "layers": 3,
        "heads": 4,
        "kv_heads": 4,
        "intermediate_size": 704,
        "vocab_size": 8192,
    },
    "olmo2": {
        "arch": "olmo2",
        "hidden_size": 256,
        "layers": 3,
        "heads": 4,
        "kv_heads": 4,
        "intermediate_size": 704,
        "vocab_size": 8192,
    },
}


def cases() -> list[tuple[str, str, list[int], dict]]:
    """(name, model, example lengths, TrainConfig fields)."""
    out = []
    for model in ("q256", "q512", "l384", "qw3"):
        for ckpt in (False, True):
            for lengths in ([256], [512, 256], [1024, 512, 384, 128], [128] * 4):
                for drop in (0.0, 0.1):
                    fields = {"gradient_checkpointing": ckpt, "lora_dropout": drop}
                    out.append(
                        (f"{model} {lengths} ckpt={ckpt} drop={drop}", model, lengths, fields)
                    )
    for model in ("phi3", "olmo2"):
        for ckpt in (False, True):
            for lengths in ([256], [512, 256], [384, 256, 128, 64]):
                fields = {"gradient_checkpointing": ckpt}
                out.append((f"{model} {lengths} ckpt={ckpt}", model, lengths, fields))
    special = [
        ("q256 qv", {"target_modules": "q,v"}),
        ("q256 dora", {"finetune_type": "dora"}),
        ("q256 dora nodrop", {"finetune_type": "dora", "lora_dropout": 0.0}),
        ("q256 full", {"finetune_type": "full"}),
        ("q256 full sgd", {"finetune_type": "full", "optim": "sgd"}),
        ("q256 layers2", {"lora_layers": 2}),
        ("q256 q4", {"quantize": 4}),
        ("q256 adafactor", {"optim": "adafactor"}),
    ]
    for name, fields in special:
        for ckpt in (False, True):
            f = {"gradient_checkpointing": ckpt, **fields}
            out.append((f"{name} ckpt={ckpt}", "q256", [512, 256], f))
    return out


def worker(args: dict) -> dict:
    """Set up a run, swap in the synthetic examples, train two steps; MLX's counters + plan."""
    import mlx.core as mx
    import numpy as np

    from mlx_lora.config import TrainConfig
    from mlx_lora.model.prompt import Encoded
    from mlx_lora.plan import footprint as fp
    from mlx_lora.plan.memory import plan
    from mlx_lora.train.forward import cpu_lanes
    from mlx_lora.train.loop import Meter, setup, train_step

    cfg = TrainConfig(**args["cfg"])
    rng = np.random.default_rng(0)
    examples = []
    for n in args["lengths"]:
        ids = rng.integers(10, 200, size=n).tolist()
        examples.append(Encoded(ids, [False] * (n // 4) + [True] * (n - n // 4)))
    p = plan(cfg, examples, model_dir=Path(cfg.model))
    ckpt = bool(cfg.gradient_checkpointing)
    mb = p.batches[-1]
    terms = fp.activation_terms(cfg, p.shape, mb, p.nbytes, ckpt, p.gpu)
    mx.reset_peak_memory()
    run, _ = setup(cfg)
    mx.synchronize()
    load_peak, held = mx.get_peak_memory(), mx.get_active_memory()
    run.train_ex = examples
    run.steps_per_epoch = math.ceil(len(examples) / run.per_step)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with cpu_lanes(cfg.per_device_train_batch_size if run.eager else 1) as lanes:
        run.lanes = lanes
        for _ in range(2):
            train_step(run, Meter())
            run.state.global_step += 1
    own, grads, optim = p.state_bytes()
    return {
        "load_peak": load_peak,
        "held": held,
        "step_peak": mx.get_peak_memory(),
        "seconds": time.perf_counter() - t0,
        "path": p.shape.path,
        "ckpt": ckpt,
        "terms": terms,
        "batch": list(astuple(mb)),
        "plan_weights": sum(p.weights().values()),
        "plan_state": own + optim,
        "plan_grads": grads,
        "plan_load": p.load_bytes(),
        "plan_train": p.train_bytes(ckpt),
    }


def build(work: Path, name: str) -> Path:
    out = work / "models" / name
    if not out.is_dir():
        kw = dict(MODELS[name])
        make_tiny_model(out, dtype="float32", **kw)
    return out


def measure(work: Path, only: str | None) -> None:
    from mlx_lora.core.blas import relaunch_env

    results = work / "results.jsonl"
    done = set()
    if results.is_file():
        done = {json.loads(ln)["name"] for ln in results.read_text().splitlines() if ln.strip()}
    env = relaunch_env() or os.environ.copy()
    data = SAMPLE_DATA
    for name, model, lengths, fields in cases():
        if name in done or (only and only not in name):
            continue
        cfg = {
            "model": str(build(work, model)),
            "data": str(data),
            "output_dir": str(work / "run"),
            "overwrite_output_dir": True,
            "max_steps": 1,
            "save_steps": 10**9,
            "plot": False,
            "per_device_train_batch_size": len(lengths),
            "gradient_accumulation_steps": 1,
            "max_seq_length": max(lengths),
            **fields,
        }
        job = json.dumps({"cfg": cfg, "lengths": lengths})
        r = subprocess.run(
            [sys.executable, __file__, "--worker", job], env=env, capture_output=True, text=True
        )
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{name}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        rec = {"name": name, **json.loads(line[-1][7:])}
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        act = rec["step_peak"] - rec["held"] - rec["plan_grads"]
        pred = rec["plan_train"] - rec["plan_weights"] - rec["plan_state"] - rec["plan_grads"]
        print(
            f"{name}: act {act / 1e6:.1f} MB, plan {pred / 1e6:.1f} MB ({pred / act - 1:+.0%})",
            flush=True,
        )


def fit(work: Path) -> None:
    import numpy as np

    from mlx_lora.plan.footprint import TERMS

    recs = [json.loads(ln) for ln in (work / "results.jsonl").read_text().splitlines() if ln]
    table = {}
    for path in ("fast", "packed", "general"):
        for ckpt in (False, True):
            rows = [r for r in recs if r["path"] == path and r["ckpt"] == ckpt]
            if not rows:
                continue
            # Few cases (the packed and general paths): only the terms that dominate there.
            terms = TERMS if len(rows) >= 10 else FEW_TERMS
            x = np.array([[r["terms"][t] for t in terms] for r in rows], dtype=float)
            y = np.array([r["step_peak"] - r["held"] - r["plan_grads"] for r in rows], float)
            # With checkpointing every block's input is certainly kept (the tiny models here
            # are too shallow to tell it from the other terms): at least once.
            floor = np.array([1.0 if ckpt and t == "blocks" else 0.0 for t in terms])
            rest = y - x @ floor
            coef = floor + nnls(x / rest[:, None], np.ones(len(y)))
            err = x @ coef / y - 1
            table[(path, ckpt)] = {t: round(float(c), 3) for t, c in zip(terms, coef, strict=True)}
            print(
                f"{path} ckpt={ckpt}: n={len(rows)} "
                + ", ".join(f"{t} {c:.3f}" for t, c in zip(terms, coef, strict=True))
                + f"; rms {np.sqrt(np.mean(err**2)):.1%}, worst {np.abs(err).max():.1%}"
            )
            for r, e in zip(rows, err, strict=True):
                if abs(e) > 0.1:
                    print(f"    {r['name']}: {e:+.1%}")
    print("\nfor mlx_lora.plan.footprint.COEF (" + ", ".join(TERMS) + "):")
    for key, coef in table.items():
        print(f"    {key!r}: {tuple(coef.get(t, 0.0) for t in TERMS)!r},")


def nnls(a, b, iters: int = 50):
    """Non-negative least squares by dropping negative coefficients and refitting."""
    import numpy as np

    active = np.ones(a.shape[1], dtype=bool)
    active &= np.abs(a).sum(axis=0) > 0
    coef = np.zeros(a.shape[1])
    for _ in range(iters):
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        coef[:] = 0
        coef[active] = sol
        if (sol >= 0).all():
            break
        idx = np.flatnonzero(active)[np.argmin(sol)]
        active[idx] = False
    return coef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/calibrate-plan"))
    ap.add_argument("--fit", action="store_true", help="fit COEF from the measured results")
    ap.add_argument("--only", help="measure only the cases whose name contains this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
    elif args.fit:
        fit(args.work)
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        measure(args.work, args.only)


if __name__ == "__main__":
    main()
