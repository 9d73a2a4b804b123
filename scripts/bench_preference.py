"""Benchmark ``--method dpo|orpo`` against mlx-lm-lora (PyPI ``mlx-lm-lora``) on the same pairs.

Both tools train the same model folder on the same preference pairs (TRL's ``prompt``/``chosen``/
``rejected`` strings; mlx-lm-lora reads them as ``train.jsonl``) with the same batch, steps,
learning rate (constant), LoRA rank / targets (all 7 linears of every block) / effective scale,
optimizer (AdamW, no weight decay, no clipping), beta, ``--max-seq-length``, fp32 weights and the
same BLAS. Runs alternate A B A B, each in its own process; mlx-lm-lora runs in its own venv
(``--lmlora-python``, default ``/work/venv-lmlora/bin/python``; its pins differ from ours).

Measured, in this run only: real (non-pad) tokens of chosen + rejected sequences per second of
training-step time (both tools' own step timers; evaluation excluded), MLX's peak memory
(``mx.get_peak_memory``, loading included: mlx-lm-lora's DPO loads a second copy of the model as
its reference, ours switches the adapter off), and the last logged training loss of each (both
start at ln 2 = 0.693 for DPO). The token count is the same for both: ours counts the real tokens
of its packed rows, mlx-lm-lora's batches are counted by the worker as they are drawn.

    python scripts/bench_preference.py                       # dpo and orpo, bench model
    python scripts/bench_preference.py --method dpo --settings defaults,off,on
    python scripts/bench_preference.py --reduced             # CI size (< 3 minutes)

Without mlx-lm-lora (no ``--lmlora-python`` interpreter that imports it) it prints a skip line
and exits 0, so CI does not fail on a machine without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_TOKENIZER = SHARED / "fixtures" / "qwen15-tokenizer"
HUANHUAN = SHARED / "data" / "huanhuan.json"
LMLORA_PYTHON = Path("/work/venv-lmlora/bin/python")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pairs(recs: list[dict], n: int, shift: int = 7) -> list[dict]:
    """TRL preference pairs from huanhuan: the record's answer chosen, another record's answer
    (``shift`` records on) rejected; realistic lengths, both strings."""
    out = []
    for i in range(n):
        r, other = recs[i], recs[(i + shift) % len(recs)]
        prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
        out.append({"prompt": prompt, "chosen": r["output"], "rejected": other["output"]})
    return out


# ---------------------------------------------------------------- workers (run in subprocesses)


def use_clock(module, clock: str) -> None:
    """``--clock cpu`` for the peer's own step timer (this runs in mlx-lm-lora's interpreter,
    which has no mlx_lora: :func:`mlx_lora.testing.bench.use_clock` is ours)."""
    if clock == "cpu":
        module.time = types.SimpleNamespace(perf_counter=time.process_time)


def worker_ours(a: dict) -> dict:
    from mlx_lora.testing.bench import train_ours

    res, log = train_ours(a, TARGETS, method=a["method"], beta=a["beta"], weight_decay=0.0)
    tokens = log[-1]["train_tokens"]
    return {
        "seconds": tokens / res.tokens_per_second,
        "tokens": tokens,
        "peak_memory_gb": res.peak_memory_gb,
        "loss": [h["loss"] for h in log if "loss" in h][-1],
        "checkpointing": res.gradient_checkpointing,
    }


def count_tokens(module, name: str, counter: list[int]) -> None:
    """Wrap mlx-lm-lora's batch iterator ``module.name`` so every batch it yields adds its real
    tokens (chosen + rejected up to the last answer token, the mask's end) to ``counter``."""
    import numpy as np

    inner = getattr(module, name)

    def wrapped(*args, **kw):
        for batch in inner(*args, **kw):
            if not kw.get("train"):  # its evaluation's batches
                yield batch
                continue
            for m in batch[2:4]:
                m = np.array(m)
                ends = m.shape[1] - np.argmax(m[:, ::-1] > 0, axis=1)
                counter[0] += int(np.where(m.any(axis=1), ends, 0).sum())
            yield batch

    setattr(module, name, wrapped)


def lmlora_args(a: dict):
    import types

    from mlx_lm_lora.train import CONFIG_DEFAULTS, build_parser

    data = Path(a["out"]) / "data"
    data.mkdir(parents=True, exist_ok=True)
    recs = json.loads(Path(a["train"]).read_text(encoding="utf-8"))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    args = vars(build_parser().parse_args([]))  # what its main() does: parser, then defaults
    args.update({k: v for k, v in CONFIG_DEFAULTS.items() if args.get(k) is None})
    args.update(
        model=a["model"], train=True, data=str(data), train_mode=a["method"], seed=a["seed"],
        num_layers=-1, batch_size=a["batch"], iters=a["steps"], val_batches=1,
        learning_rate=a["lr"], steps_per_report=max(1, a["steps"] // 4),
        steps_per_eval=10**9, adapter_path=str(Path(a["out"]) / "adapters"), save_every=10**9,
        max_seq_length=a["max_len"], grad_checkpoint=bool(a["checkpointing"]), beta=a["beta"],
        optimizer="adamw", optimizer_config={"adamw": {"weight_decay": 0.0}}, fuse=False,
        mask_prompt=True, lora_parameters={"rank": a["rank"], "dropout": 0.0,
                                           "scale": float(a["scale"])},
    )  # fmt: skip
    return types.SimpleNamespace(**args)


def worker_lmlora(a: dict) -> dict:
    """mlx-lm-lora's own ``run`` (its CLI's body) with a callback collecting its reports."""
    import mlx.core as mx
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as cli
    from mlx_lm_lora.trainer import dpo_trainer, orpo_trainer

    # a CPU device has no "max_recommended_working_set_size"; wiring memory is a Metal notion
    mx.set_wired_limit = lambda *_: 0
    info = mx.device_info
    mx.device_info = lambda: {"max_recommended_working_set_size": 0, **info()}
    counter = [0]
    trainer = dpo_trainer if a["method"] == "dpo" else orpo_trainer
    count_tokens(trainer, f"iterate_{a['method']}_batches", counter)
    use_clock(trainer, a["clock"])

    class Collect(TrainingCallback):
        def __init__(self):
            self.train = []

        def on_train_loss_report(self, info):
            self.train.append(info)

    cb = Collect()
    cli.run(lmlora_args(a), cb)
    seconds, prev = 0.0, 0  # the step time of each report window, from its own rates
    for r in cb.train:
        seconds += (r["trained_tokens"] - prev) / r["tokens_per_second"]
        prev = r["trained_tokens"]
    return {
        "seconds": seconds,
        "tokens": counter[0],
        "peak_memory_gb": max(r["peak_memory"] for r in cb.train),
        "loss": cb.train[-1]["train_loss"],
    }


WORKERS = {"ours": worker_ours, "lmlora": worker_lmlora}


def run_worker(kind: str, a: dict, env: dict, python: str) -> dict:
    out = subprocess.run(
        [python, __file__, "--worker", kind, json.dumps(a)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver


def lmlora_python(explicit: str | None) -> tuple[str | None, str]:
    """An interpreter that imports mlx_lm_lora, and its version (or why there is none)."""
    py = explicit or os.environ.get("MLX_LM_LORA_PYTHON") or str(LMLORA_PYTHON)
    if not Path(py).exists() and not explicit:
        return None, f"no {py}"
    probe = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.version('mlx-lm-lora'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        return None, f"{py} cannot import mlx_lm_lora"
    return py, probe.stdout.strip()


OURS_CKPT = {"defaults": None, "off": False, "on": True}  # None: ours' default, auto
THEIRS_CKPT = {"defaults": False, "off": False, "on": True}  # mlx-lm-lora's default: off


def bench_method(method: str, common: dict, args, env: dict, theirs_py: str) -> list[dict]:
    """A B A B for one method: ours per setting, mlx-lm-lora per distinct checkpointing."""
    runs: dict[str, list[dict]] = {}
    c = {**common, "method": method}
    for i in range(args.repeats):
        done: set = set()
        for s in args.settings:
            r = run_worker("ours", {**c, "checkpointing": OURS_CKPT[s],
                                    "out": str(args.tmp / f"ours-{method}-{s}-{i}")},
                           env, sys.executable)  # fmt: skip
            runs.setdefault(f"ours/{s}", []).append(r)
            ck = "on" if r["checkpointing"] else "off"
            print(f"  {method} run {i + 1} ours {s:8s} (ckpt {ck}) {r['tokens']:7,} tokens"
                  f" {r['tokens'] / r['seconds']:8.1f} tok/s  peak {r['peak_memory_gb']:.3f} GB  "
                  f"loss {r['loss']:.4f}", flush=True)  # fmt: skip
            if THEIRS_CKPT[s] in done:
                continue
            done.add(THEIRS_CKPT[s])
            t = run_worker("lmlora", {**c, "checkpointing": THEIRS_CKPT[s],
                                      "out": str(args.tmp / f"lmlora-{method}-{s}-{i}")},
                           env, theirs_py)  # fmt: skip
            runs.setdefault(f"lmlora/{THEIRS_CKPT[s]}", []).append(t)
            ck = "on" if THEIRS_CKPT[s] else "off"
            print(f"  {method} run {i + 1} mlx-lm-lora (ckpt {ck}) {t['tokens']:7,} tokens"
                  f"  {t['tokens'] / t['seconds']:8.1f} tok/s  peak {t['peak_memory_gb']:.3f} GB"
                  f"  loss {t['loss']:.4f}", flush=True)  # fmt: skip
    rows = []
    for s in args.settings:
        ours, theirs = runs[f"ours/{s}"], runs[f"lmlora/{THEIRS_CKPT[s]}"]
        rows.append({
            "method": method, "setting": s,
            "ckpt": ("on" if ours[-1]["checkpointing"] else "off") + "/"
                    + ("on" if THEIRS_CKPT[s] else "off"),
            "tok_s": statistics.median(r["tokens"] / r["seconds"] for r in ours),
            "tok_s_theirs": statistics.median(r["tokens"] / r["seconds"] for r in theirs),
            "mem": statistics.median(r["peak_memory_gb"] for r in ours),
            "mem_theirs": statistics.median(r["peak_memory_gb"] for r in theirs),
            "loss": ours[-1]["loss"], "loss_theirs": theirs[-1]["loss"],
            "tokens": ours[-1]["tokens"], "tokens_theirs": theirs[-1]["tokens"],
        })  # fmt: skip
    return rows


def report(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print("| method | setting | ckpt ours/theirs | tokens/s ours | mlx-lm-lora | speed | peak GB "
          "ours | mlx-lm-lora | memory | last loss ours / theirs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['setting']} | {r['ckpt']} | {r['tok_s']:,.0f} | "
              f"{r['tok_s_theirs']:,.0f} | **{r['tok_s'] / r['tok_s_theirs']:.2f}×** | "
              f"{r['mem']:.2f} | {r['mem_theirs']:.2f} | **{r['mem'] / r['mem_theirs']:.2f}** | "
              f"{r['loss']:.3f} / {r['loss_theirs']:.3f} |")  # fmt: skip
    print("speed = our tokens/s ÷ theirs (goal ≥ 1.5×); memory = our peak ÷ theirs (goal ≤ 0.6). "
          "Tokens: real tokens of chosen + rejected; theirs counted over the batches it drew "
          "(it samples batches with replacement, ours takes an epoch's order).")  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("payload", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--method", action="append", choices=["dpo", "orpo"],
                   help="repeatable (default: dpo and orpo)")  # fmt: skip
    p.add_argument("--model", default="bench",
                   help="bench (generated, Qwen's 151,936-token vocabulary, --hidden/--layers), "
                   "smollm2-135m, qwen2.5-0.5b, or a model folder / .gguf / hub id")  # fmt: skip
    p.add_argument(
        "--settings",
        default="defaults",
        help="comma-separated: defaults (ours auto checkpointing, theirs off), off, on",
    )
    p.add_argument(
        "--reduced",
        action="store_true",
        help="CI size: hidden 256, 4 layers, 8 pairs, max-seq-length 256, 1 repeat",
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=0, help="default: one epoch = pairs / batch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=4.0, help="effective LoRA scale (alpha / r)")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by wall clock, or by process CPU time with one BLAS thread "
                   "(robust on a shared machine)")  # fmt: skip
    p.add_argument("--lmlora-python", help="python of a venv with mlx-lm-lora")
    p.add_argument("--bf16", action="store_true", help="keep bf16 weights (default fp32)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.payload))))
        return
    theirs_py, version = lmlora_python(args.lmlora_python)
    if theirs_py is None:
        print(f"skipped: mlx-lm-lora is not installed ({version}); "
              "python3 -m venv /work/venv-lmlora && /work/venv-lmlora/bin/pip install "
              "'mlx[cpu]' mlx-lm-lora==5.10.2")  # fmt: skip
        return
    if not HUANHUAN.is_file() or not QWEN_TOKENIZER.is_dir():
        print(f"skipped: needs {QWEN_TOKENIZER} and {HUANHUAN}")
        return
    if args.reduced:
        args.hidden, args.layers, args.pairs, args.repeats = 256, 4, 8, 1
        args.settings, args.max_seq_length = "defaults", 256
    args.settings = args.settings.split(",")
    args.steps = args.steps or args.pairs // args.batch
    from mlx_lora.core.blas import relaunch_env
    from mlx_lora.testing.bench import prepare_model

    env = relaunch_env() or os.environ.copy()  # both tools with the same (fast) BLAS
    if args.clock == "cpu":
        env["OPENBLAS_NUM_THREADS"] = "1"
    recs = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pref-") as tmp:
        args.tmp = Path(tmp)
        (args.tmp / "train.json").write_text(
            json.dumps(pairs(recs, args.pairs), ensure_ascii=False), encoding="utf-8"
        )
        model = prepare_model(args.model, args.tmp, args, qwen_tokenizer=QWEN_TOKENIZER)
        cfg = json.loads((model / "config.json").read_text())
        common = dict(
            model=str(model), train=str(args.tmp / "train.json"), steps=args.steps,
            batch=args.batch, lr=args.lr, beta=args.beta, rank=args.rank, scale=args.scale,
            max_len=args.max_seq_length, seed=0, clock=args.clock,
        )  # fmt: skip
        t0 = time.perf_counter()
        for method in args.method or ["dpo", "orpo"]:
            rows += bench_method(method, common, args, env, theirs_py)
    took = time.perf_counter() - t0
    report(rows, f"model {args.model}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, "
           f"hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}; {args.pairs} pairs, batch "
           f"{args.batch}, {args.steps} steps, max-seq-length {args.max_seq_length}, rank "
           f"{args.rank}, fp32, {args.clock} clock; mlx-lm-lora {version}; {took:.0f} s; "
           f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
