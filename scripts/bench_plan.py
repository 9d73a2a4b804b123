"""Plan vs measured: does ``python -m mlx_lora.plan`` predict the peak memory of ``train``?

Each configuration is trained for a few steps in a fresh process (with the system OpenBLAS, as
the commands run) on huanhuan examples, and its plan (the same function ``train`` calls, with the
same data) is compared with what the process really used:

  - MLX: predicted ``Plan.mlx_peak_bytes()`` vs ``mx.get_peak_memory()`` over loading + training
  - process: predicted ``Plan.peak_bytes()`` vs the process's own peak RSS (``VmHWM``)

Models come from ``mlx_lora.testing.tiny_model``: tiny (hidden 64, 2 blocks), bench-size (hidden
512, 8 blocks, the real 151,936-token Qwen vocabulary) and a Qwen1.5-4B-shaped one (random bf16
weights, the real 4B ``config.json``; about 8 GB written once into ``--work``).

    python scripts/bench_plan.py --work /tmp/bench-plan           # the README table
    python scripts/bench_plan.py --work /tmp/bench-plan --no-4b   # without the 4B-shaped model
    python scripts/bench_plan.py --work /tmp/bench-plan --reuse   # re-plan, measurements kept
    python scripts/bench_plan.py --fits                           # "what fits on an 8/16/24 GB Mac"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory

from mlx_lora.config import TrainConfig
from mlx_lora.core.files import read_json
from mlx_lora.core.units import human_bytes as gb
from mlx_lora.data.dataset import read_records
from mlx_lora.plan.memory import Budget, plan
from mlx_lora.testing.tiny_model import make_tiny_model, shape_from_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_DIR = SHARED / "fixtures" / "qwen15-tokenizer"
HUANHUAN = SHARED / "data" / "huanhuan.json"
MARK = "BENCH_PLAN_RESULT "
TARGET = 0.15

# name, model, TrainConfig fields (besides model/data/output)
CONFIGS = [
    ("tiny, batch 1", "tiny", {"per_device_train_batch_size": 1, "gradient_checkpointing": False}),
    (
        "tiny, batch 4, ckpt",
        "tiny",
        {"per_device_train_batch_size": 4, "gradient_checkpointing": True},
    ),
    (
        "bench, batch 4, ckpt",
        "bench",
        {"per_device_train_batch_size": 4, "gradient_checkpointing": True},
    ),
    (
        "bench, batch 4",
        "bench",
        {"per_device_train_batch_size": 4, "gradient_checkpointing": False},
    ),
    (
        "bench, batch 1, q4, ckpt",
        "bench",
        {"per_device_train_batch_size": 1, "quantize": 4, "gradient_checkpointing": True},
    ),
    (
        "bench, batch 4, q8",
        "bench",
        {"per_device_train_batch_size": 4, "quantize": 8, "gradient_checkpointing": False},
    ),
    (
        "4B-shaped, batch 1, q4, ckpt",
        "4b",
        {
            "per_device_train_batch_size": 1,
            "quantize": 4,
            "gradient_checkpointing": True,
            "max_steps": 2,
        },
    ),
]
COMMON = {
    "max_steps": 3,
    "gradient_accumulation_steps": 2,
    "logging_steps": 1,
    "save_steps": 10**9,
    "plot": False,
    "overwrite_output_dir": True,
}


def worker(args: dict) -> dict:
    """Train in this process; MLX's peak over loading and training, and the peak RSS."""
    import mlx.core as mx

    from mlx_lora.config import TrainConfig
    from mlx_lora.train.loop import train
    from mlx_lora.train.report import peak_rss_bytes

    peaks = []
    reset = mx.reset_peak_memory

    def record() -> None:  # train resets the counter after loading: keep the load peak
        peaks.append(mx.get_peak_memory())
        reset()

    mx.reset_peak_memory = record
    t0 = time.perf_counter()
    train(TrainConfig(**args), progress=False)
    peaks.append(mx.get_peak_memory())
    return {
        "mlx_peak": max(peaks),
        "rss": peak_rss_bytes(),
        "seconds": time.perf_counter() - t0,
    }


def build_models(work: Path, with_4b: bool) -> dict[str, Path]:
    models = {"tiny": work / "tiny", "bench": work / "bench"}
    if not models["tiny"].is_dir():
        make_tiny_model(models["tiny"])
    if not models["bench"].is_dir():
        make_tiny_model(
            models["bench"],
            tokenizer=QWEN_DIR,
            hidden_size=512,
            layers=8,
            heads=8,
            kv_heads=4,
            intermediate_size=1408,
        )
    if with_4b:
        models["4b"] = work / "qwen15-4b-shaped"
        if not models["4b"].is_dir():
            print("writing the Qwen1.5-4B-shaped model (about 8 GB, once)...", flush=True)
            make_tiny_model(
                models["4b"], tokenizer=QWEN_DIR, **shape_from_config(QWEN_DIR / "config.json")
            )
    return models


def measure(cfg) -> dict:
    """Train ``cfg`` in a fresh process (with the system OpenBLAS, as the commands run)."""
    from mlx_lora.core.blas import relaunch_env

    env = relaunch_env() or os.environ.copy()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(asdict(cfg))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def run_one(name: str, model: Path, fields: dict, data: Path, work: Path, reuse: bool) -> dict:
    from mlx_lora.config import TrainConfig
    from mlx_lora.plan.memory import examples_for, plan

    cfg = TrainConfig(
        **{**COMMON, **fields, "model": str(model), "data": str(data)},
        output_dir=str(work / "runs" / name.replace(", ", "-").replace(" ", "_")),
    )
    p = plan(cfg, examples_for(cfg, model), model_dir=model)
    cache = work / "measured.json"
    known = read_json(cache) if reuse and cache.is_file() else {}
    measured = known.get(name) or measure(cfg)
    known = read_json(cache) if cache.is_file() else {}
    cache.write_text(json.dumps({**known, name: measured}, indent=1))
    mb, _, _ = p.worst(p.checkpointing)
    return {
        "name": name,
        "batch": f"{mb.rows}×{mb.length}",
        "plan_mlx": p.mlx_peak_bytes(),
        "plan_rss": p.peak_bytes(),
        **measured,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| configuration | worst micro-batch | plan, MLX | MLX peak | error | plan, process | "
        "peak RSS | error |\n|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        e1 = r["plan_mlx"] / r["mlx_peak"] - 1
        e2 = r["plan_rss"] / r["rss"] - 1
        out.append(
            f"| {r['name']} | {r['batch']} | {gb(r['plan_mlx'])} | {gb(r['mlx_peak'])} | "
            f"{e1:+.1%} | {gb(r['plan_rss'])} | {gb(r['rss'])} | {e2:+.1%} |"
        )
    return "\n".join(out)


def fits_table() -> str:
    """Qwen1.5 0.5B/1.8B/4B/7B at the seed's settings on 8/16/24 GB Macs (Metal's recommended
    working set is 2/3 of the memory), planned for the huanhuan data's real batches."""
    import tempfile

    from mlx_lora.config import TrainConfig
    from mlx_lora.plan.memory import Budget, examples_for, plan

    sizes = {
        "0.5B": (1024, 24, 16, 2816, True),
        "1.8B": (2048, 24, 16, 5504, False),
        "4B": (2560, 40, 20, 6912, False),
        "7B": (4096, 32, 32, 11008, False),
    }
    macs = (8, 16, 24)
    label = {None: "LoRA bf16", 8: "QLoRA 8-bit", 4: "QLoRA 4-bit"}
    base = read_json(QWEN_DIR / "config.json")
    head = (
        "| model | "
        + " | ".join(f"{m} GB Mac" for m in macs)
        + " | predicted peak, LoRA bf16 / QLoRA 8-bit / QLoRA 4-bit (without / with checkpointing)"
        + " |\n|---|"
        + "---|" * (len(macs) + 1)
    )
    out = [head]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((QWEN_DIR / name).read_bytes())
        examples = None
        for size, (d, n, h, f, tied) in sizes.items():
            conf = base | {
                "hidden_size": d,
                "num_hidden_layers": n,
                "num_attention_heads": h,
                "num_key_value_heads": h,
                "intermediate_size": f,
                "tie_word_embeddings": tied,
            }
            (folder / "config.json").write_text(json.dumps(conf), encoding="utf-8")
            cells = []
            for q in (None, 8, 4):
                cfg = TrainConfig(model=str(folder), data=str(HUANHUAN), quantize=q)
                if examples is None:
                    examples = examples_for(cfg, folder)
                p = plan(cfg, examples, model_dir=folder, gpu=True, budget=Budget(None, "Mac"))
                cells.append((q, p.peak_bytes(False), p.peak_bytes(True)))
            row = []
            for mem in macs:
                budget = mem * 1e9 * 2 / 3
                fits = [
                    (q, "" if off * 1.1 <= budget else ", checkpointing")
                    for q, off, on in cells
                    if on * 1.1 <= budget
                ]
                row.append(f"{label[fits[0][0]]}{fits[0][1]}" if fits else "no")
            peaks = " · ".join(f"{gb(off)[:-3]} / {gb(on)}" for _, off, on in cells)
            out.append(f"| Qwen1.5-{size} | " + " | ".join(row) + f" | {peaks} |")
    return "\n".join(out)


QWEN25 = {  # Qwen2.5 Instruct shapes: hidden, layers, heads, kv heads, intermediate, tied, vocab
    "0.5B": (896, 24, 14, 2, 4864, True, 151936),
    "1.5B": (1536, 28, 12, 2, 8960, True, 151936),
    "3B": (2048, 36, 16, 2, 11008, True, 151936),
    "7B": (3584, 28, 28, 4, 18944, False, 152064),
}
METHOD_SETTINGS = dict(
    per_device_train_batch_size=1, max_seq_length=512, gradient_accumulation_steps=16
)


def _cheapest(cells: list[tuple], budget: float) -> str:
    """The first setting (LoRA bf16, QLoRA 8, QLoRA 4; checkpointing only when needed) whose
    peak + 10% fits ``budget``."""
    label = {None: "bf16", 8: "Q8", 4: "Q4"}
    for q, off, on in cells:
        if off * 1.1 <= budget:
            return label[q]
        if on * 1.1 <= budget:
            return f"{label[q]}+ckpt"
    return "no"


def methods_table() -> str:
    """Per method, what fits on an 8 / 16 GB Mac (Metal's working set: 2/3 of the memory) for
    Qwen2.5 0.5B-7B shapes: batch 1 × accumulation 16, every sequence --max-seq-length 512 (no
    data: the most any data needs), r 8 on the 7 linears; GRPO 4 answers of up to 256 tokens."""
    methods = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
    out = ["| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    peaks = []
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size, (d, n, h, kv, f, tied, v) in QWEN25.items():
            conf = read_json(QWEN_DIR / "config.json") | {
                "hidden_size": d, "num_hidden_layers": n, "num_attention_heads": h,
                "num_key_value_heads": kv, "intermediate_size": f, "tie_word_embeddings": tied,
                "vocab_size": v,
            }  # fmt: skip
            (folder / "config.json").write_text(json.dumps(conf), encoding="utf-8")
            row = []
            for m in methods:
                extra = dict(num_generations=4, max_completion_length=256) if m == "grpo" else {}
                cells = []
                for q in (None, 8, 4):
                    cfg = TrainConfig(model=str(folder), method=m, quantize=q, **METHOD_SETTINGS,
                                      **extra)  # fmt: skip
                    p = plan(cfg, None, model_dir=folder, gpu=True, budget=Budget(None, "Mac"))
                    cells.append((q, p.peak_bytes(False), p.peak_bytes(True)))
                row.append(" / ".join(_cheapest(cells, mem * 1e9 * 2 / 3) for mem in (8, 16)))
                peaks.append(f"{size} {m}: " + " · ".join(
                    f"{gb(off)} / {gb(on)}" for _, off, on in cells))  # fmt: skip
            out.append(f"| Qwen2.5-{size} | " + " | ".join(row) + " |")
    return "\n".join(out + ["", *peaks])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-plan"), help="models, runs")
    ap.add_argument("--no-4b", action="store_true", help="skip the Qwen1.5-4B-shaped model")
    ap.add_argument("--examples", type=int, default=64, help="huanhuan records to train on")
    ap.add_argument("--fits", action="store_true", help="print the 'what fits' table and exit")
    ap.add_argument(
        "--methods",
        action="store_true",
        help="print the per-method 'what fits' table (Qwen2.5 shapes) and exit",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the measurements in WORK/measured.json (only the plan is recomputed)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if not (QWEN_DIR.is_dir() and HUANHUAN.is_file()):
        print(f"skipped: needs {QWEN_DIR} and {HUANHUAN}")
        return
    if args.fits:
        print(fits_table())
        return
    if args.methods:
        print(methods_table())
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "huanhuan-sample.json"
    records = read_records(HUANHUAN)[: args.examples]
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    models = build_models(args.work, not args.no_4b)
    rows = []
    for name, model, fields in CONFIGS:
        if model in models:
            rows.append(run_one(name, models[model], fields, data, args.work, args.reuse))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    worst = max(abs(r["plan_mlx"] / r["mlx_peak"] - 1) for r in rows)
    worst = max(worst, *(abs(r["plan_rss"] / r["rss"] - 1) for r in rows))
    print(f"\nlargest error {worst:.1%} (target ±{TARGET:.0%})")


if __name__ == "__main__":
    main()
