"""Benchmark ``mlx_lora.train`` against ``mlx_lm.lora`` on the same examples, in one run.

Each ``--model`` is trained by both tools on the same huanhuan chats (one epoch by default) with the
same batch, steps, learning rate (constant), LoRA rank/targets/effective scale, optimizer (AdamW, no
weight decay, no clipping) and prompt masking, fp32 weights, the same (system OpenBLAS) BLAS. Runs
alternate A B A B, each in its own process; settings: ``defaults`` (each tool's own: ours
``--gradient-checkpointing auto``, mlx_lm.lora's default off), ``off`` (checkpointing off in both),
``on``. Printed from this run only: real (non-pad) tokens/s, peak memory, final validation loss of
both adapters scored with our loss, and our MFU (4·N·tokens over a matmul roofline measured here).

Models: ``bench`` (generated: Qwen's 151,936-token vocabulary, ``--hidden``/``--layers``),
``smollm2-135m`` (the real SmolLM2-135M-Instruct, imported from its Q4_1 GGUF, dequantized),
``qwen2.5-0.5b`` (Qwen2.5-0.5B's shape with random weights: speed does not depend on them), or a
model folder, ``.gguf`` file or hub id.

    python scripts/bench_train.py --model bench --model smollm2-135m --model qwen2.5-0.5b
    python scripts/bench_train.py --model ~/models/SmolLM2-135M-Instruct   # a real model
    python scripts/bench_train.py --reduced       # CI size
    python scripts/bench_train.py --mode generate # chat generation vs mlx_lm.generate
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_TOKENIZER = SHARED / "fixtures" / "qwen15-tokenizer"
HUANHUAN = SHARED / "data" / "huanhuan.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEYS = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]


def messages(rec: dict) -> list[dict]:
    user = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


# ---------------------------------------------------------------- workers (run in subprocesses)


def worker_ours(a: dict) -> dict:
    from mlx_lora.testing.bench import train_ours

    res, log = train_ours(a, TARGETS, eval_data=a["valid"], eval_steps=a["steps"])
    return {
        "seconds": log[-1]["train_tokens"] / res.tokens_per_second,
        "tokens": log[-1]["train_tokens"],
        "peak_memory_gb": res.peak_memory_gb,
        "val_loss": res.eval_loss,
        "targets": log[-1]["train_target_tokens"],
        "checkpointing": res.gradient_checkpointing,
        "val_loss_mlx_lm_scoring": mlx_lm_val_loss(a, Path(a["out"])),
    }


def mlx_lm_setup(a: dict):
    """mlx_lm.lora's arguments and its train/valid datasets for this run (its ``messages``
    format, prompt masked), as its CLI would build them."""
    import types

    import numpy as np
    from mlx_lm import lora as mlx_lora_cli

    data_dir = Path(a["out"]) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, src in (("train", a["train"]), ("valid", a["valid"])):
        recs = json.loads(Path(src).read_text(encoding="utf-8"))
        (data_dir / f"{split}.jsonl").write_text(
            "".join(json.dumps({"messages": messages(r)}, ensure_ascii=False) + "\n" for r in recs),
            encoding="utf-8",
        )
    args = dict(mlx_lora_cli.CONFIG_DEFAULTS)
    args.update(
        model=a["model"],
        train=True,
        data=str(data_dir),
        seed=a["seed"],
        num_layers=-1,
        batch_size=a["batch"],
        iters=a["steps"],
        val_batches=-1,
        learning_rate=a["lr"],
        steps_per_report=max(1, a["steps"] // 4),
        steps_per_eval=a["steps"],
        adapter_path=str(Path(a["out"]) / "adapters"),
        save_every=10**9,
        max_seq_length=a["max_len"],
        grad_checkpoint=bool(a["checkpointing"]),
        mask_prompt=True,
        optimizer="adamw",
        optimizer_config={"adamw": {"weight_decay": 0.0}},
        lora_parameters={
            "rank": a["rank"],
            "dropout": 0.0,
            "scale": float(a["scale"]),
            "keys": KEYS,
        },
    )
    args = types.SimpleNamespace(**args)
    np.random.seed(args.seed)
    return args


def worker_mlx_lm(a: dict) -> dict:
    import mlx.optimizers  # noqa: F401 - imported by mlx_lm.lora anyway
    from mlx.utils import tree_flatten
    from mlx_lm import lora as mlx_lora_cli
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.utils import load

    from mlx_lora.testing.bench import use_clock

    use_clock(trainer, a["clock"])

    class Collect(TrainingCallback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_loss_report(self, info):
            self.train.append(info)

        def on_val_loss_report(self, info):
            self.val.append(info)

    args = mlx_lm_setup(a)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = mlx_lora_cli.load_dataset(args, tokenizer)
    cb = Collect()
    mlx_lora_cli.train_model(args, model, train_set, valid_set, cb)
    same_metric = our_val_loss(a, {k: v for k, v in tree_flatten(model.trainable_parameters())})
    seconds, prev = 0.0, 0  # compute time of the training steps, from mlx-lm's own per-window rates
    for r in cb.train:
        seconds += (r["trained_tokens"] - prev) / r["tokens_per_second"]
        prev = r["trained_tokens"]
    return {
        "seconds": seconds,
        "peak_memory_gb": max(r["peak_memory"] for r in cb.train),
        "val_loss": same_metric,
        "val_loss_own": cb.val[-1]["val_loss"],
    }


def mlx_lm_val_loss(a: dict, adapter_dir: Path) -> float:
    """Our adapter scored by mlx-lm's own validation loss (its targets: the answer, the
    end-of-turn token, the newline after it and one padding token), the mirror of
    :func:`our_val_loss`."""
    import mlx.core as mx
    from mlx_lm import lora as mlx_lora_cli
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    args = mlx_lm_setup({**a, "out": str(Path(a["out"]) / "mlx-lm-scoring")})
    model, tokenizer = load(args.model)
    model.freeze()
    linear_to_lora_layers(model, -1, args.lora_parameters)
    ours = mx.load(str(adapter_dir / "adapter_model.safetensors"))
    prefix = "base_model.model."
    model.load_weights(
        [
            (k[len(prefix) :].replace(".lora_A.weight", ".lora_a"), v.T)
            if k.endswith("lora_A.weight")
            else (k[len(prefix) :].replace(".lora_B.weight", ".lora_b"), v.T)
            for k, v in ours.items()
        ],
        strict=False,
    )
    _, valid_set, _ = mlx_lora_cli.load_dataset(args, tokenizer)
    valid = CacheDataset(valid_set)
    return float(evaluate(model, valid, args.batch_size, -1, args.max_seq_length))


def our_val_loss(a: dict, mlx_lm_lora: dict) -> float:
    """mlx-lm's trained adapter scored with our validation loss (its own leaves out the answer's
    end-of-turn token), so both tools' final losses are measured the same way.

    mlx-lm stores ``lora_a`` [in, r] and ``lora_b`` [r, out] with a plain scale; PEFT's A and B are
    their transposes, with alpha = scale · r.
    """
    import mlx.core as mx

    from mlx_lora.data.dataset import load_dataset
    from mlx_lora.model.load import load_base
    from mlx_lora.model.lora import apply_lora
    from mlx_lora.train.loss import evaluate

    model, tok, _ = load_base(Path(a["model"]), dtype=mx.float32)
    apply_lora(model, TARGETS, a["rank"], a["rank"] * a["scale"], 0.0)
    model.load_weights(
        [
            (k.replace("lora_a", "lora_A"), v.T)
            if k.endswith("lora_a")
            else (k.replace("lora_b", "lora_B"), v.T)
            for k, v in mlx_lm_lora.items()
        ],
        strict=False,
    )
    valid = load_dataset(Path(a["valid"]), tok, max_seq_length=a["max_len"]).examples
    return evaluate(model, valid, a["batch"], a["max_len"], True, tok.pad_token_id or 0)


def worker_roofline(a: dict) -> dict:
    """Best fp32 FLOP/s of the model's own GEMM shapes (mlx_lora.testing.bench's roofline, as
    scripts/profile_train.py measures it)."""
    from mlx_lora.testing.bench import roofline

    clock = time.process_time if a["clock"] == "cpu" else time.perf_counter
    return {"flops_per_second": roofline(a["hidden"], a["intermediate"], clock=clock)}


def worker_seed(a: dict) -> dict:
    """The seed's own stack: transformers Trainer + PEFT on the CPU (where torch and peft exist)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], torch_dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=a["rank"],
            lora_alpha=a["rank"] * a["scale"],
            lora_dropout=0.0,
            target_modules=TARGETS,
        ),
    )

    def encode(
        rec: dict,
    ) -> dict:  # the seed's process_func: prompt masked, answer + end of turn trained
        msgs = messages(rec)
        prompt = tok(
            tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        answer = tok(msgs[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return {
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer,
        }

    train = [encode(r) for r in json.loads(Path(a["train"]).read_text(encoding="utf-8"))]
    valid = [encode(r) for r in json.loads(Path(a["valid"]).read_text(encoding="utf-8"))]
    args = TrainingArguments(
        output_dir=str(Path(a["out"]) / "hf"),
        per_device_train_batch_size=a["batch"],
        per_device_eval_batch_size=a["batch"],
        max_steps=a["steps"],
        learning_rate=a["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=a["seed"],
        gradient_checkpointing=a["checkpointing"],
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    metrics = trainer.train().metrics
    return {
        "seconds": metrics["train_runtime"],
        "peak_memory_gb": float("nan"),
        "val_loss": trainer.evaluate()["eval_loss"],
    }


WORKERS = {
    "ours": worker_ours,
    "mlx_lm": worker_mlx_lm,
    "roofline": worker_roofline,
    "seed": worker_seed,
}


def seed_stack_python(explicit: str | None) -> str | None:
    """An interpreter with torch + peft + transformers: --seed-python, else this one if able."""
    candidates = [explicit] if explicit else [sys.executable]
    for py in candidates:
        probe = subprocess.run([py, "-c", "import torch, peft, transformers"], capture_output=True)
        if probe.returncode == 0:
            return py
    if explicit:
        raise SystemExit(f"--seed-python {explicit} cannot import torch, peft and transformers")
    return None


def run_worker(kind: str, a: dict, env: dict | None = None, python: str | None = None) -> dict:
    out = subprocess.run(
        [python or sys.executable, __file__, "--worker", kind, json.dumps(a)],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        cwd=REPO,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver


def model_params(model_dir: Path) -> tuple[int, int, dict]:
    """(block parameters, output-head parameters, config)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers, v = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
    )
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * inter
    return layers * per_layer, v * h, cfg


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def bench_model(model: Path, args, env: dict, tmp: Path) -> dict:
    """A B A B: per repeat ours (each setting) and mlx_lm.lora, each in its own process."""
    n_blocks, n_head, cfg = model_params(model)
    common = dict(
        model=str(model),
        train=str(tmp / "train.json"),
        valid=str(tmp / "valid.json"),
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        rank=args.rank,
        scale=args.scale,
        max_len=2048,
        seed=0,
        clock=args.clock,
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
    )
    ours_ckpt = {"defaults": None, "off": False, "on": True}  # None: ours' default, auto
    theirs_ckpt = {"defaults": False, "off": False, "on": True}  # mlx_lm.lora's default: off
    runs: dict[str, list[dict]] = {}
    for i in range(args.repeats):
        done_theirs: set = set()
        for setting in args.settings:
            r = run_worker(
                "ours",
                {
                    **common,
                    "checkpointing": ours_ckpt[setting],
                    "out": str(tmp / f"ours-{setting}-{i}"),
                },
                env,
            )
            runs.setdefault(f"ours/{setting}", []).append(r)
            ck = "on" if r["checkpointing"] else "off"
            print(
                f"  run {i + 1} ours {setting:8s} (ckpt {ck:3s}) {r['seconds']:8.2f} s  peak "
                f"{r['peak_memory_gb']:.3f} GB  val {r['val_loss']:.4f}",
                flush=True,
            )
            if theirs_ckpt[setting] in done_theirs:
                continue
            done_theirs.add(theirs_ckpt[setting])
            t = run_worker(
                "mlx_lm",
                {
                    **common,
                    "checkpointing": theirs_ckpt[setting],
                    "out": str(tmp / f"mlx-lm-{setting}-{i}"),
                },
                env,
            )
            runs.setdefault(f"mlx_lm/{theirs_ckpt[setting]}", []).append(t)
            print(
                f"  run {i + 1} mlx_lm.lora (ckpt {'on' if theirs_ckpt[setting] else 'off'})"
                f"   {t['seconds']:8.2f} s  peak {t['peak_memory_gb']:.3f} GB  val "
                f"{t['val_loss']:.4f}",
                flush=True,
            )
    roof = run_worker("roofline", common, env)["flops_per_second"]
    tokens = runs[f"ours/{args.settings[0]}"][0]["tokens"]
    targets = runs[f"ours/{args.settings[0]}"][0]["targets"]
    rows = []
    for setting in args.settings:
        ours, theirs = runs[f"ours/{setting}"], runs[f"mlx_lm/{theirs_ckpt[setting]}"]
        secs = median(ours, "seconds")
        rows.append(
            {
                "setting": setting,
                "ours_ckpt": "on" if ours[-1]["checkpointing"] else "off",
                "theirs_ckpt": "on" if theirs_ckpt[setting] else "off",
                "tok_s": tokens / secs,
                "tok_s_theirs": tokens / median(theirs, "seconds"),
                "mem": median(ours, "peak_memory_gb"),
                "mem_theirs": median(theirs, "peak_memory_gb"),
                "val": ours[-1]["val_loss"],
                "val_theirs": theirs[-1]["val_loss"],
                "val_theirs_own": theirs[-1]["val_loss_own"],
                "val_own_scoring": ours[-1]["val_loss_mlx_lm_scoring"],
                "mfu": 4 * (n_blocks + n_head) * tokens / secs / roof,
                "real_mfu": (4 * n_blocks * tokens + 4 * n_head * targets) / secs / roof,
            }
        )
    return {
        "cfg": cfg,
        "params": n_blocks + n_head,
        "tokens": tokens,
        "roof": roof,
        "rows": rows,
        "common": common,
        "runs": runs,
    }


def report(label: str, res: dict, args) -> None:
    cfg = res["cfg"]
    print(
        f"\nmodel {label}: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden "
        f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}, {res['params'] / 1e6:.1f}M params; "
        f"{args.examples} examples, batch {args.batch}, {args.steps} steps, {res['tokens']:,} "
        f"tokens; roofline {res['roof'] / 1e9:.1f} GFLOP/s; {args.clock} clock; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'setting':9s} {'ckpt':>7s} {'tok/s':>7s} {'mlx_lm':>7s} {'speed':>6s} "
        f"{'mem GB':>6s} {'mlx_lm':>6s} {'mem':>5s} {'val':>6s} {'mlx_lm':>6s} {'diff':>6s} "
        f"{'val*':>6s} {'mlx_lm':>6s} {'diff':>6s} {'MFU':>6s}"
    )
    for r in res["rows"]:
        print(
            f"{r['setting']:9s} {r['ours_ckpt'] + '/' + r['theirs_ckpt']:>7s} {r['tok_s']:7.1f} "
            f"{r['tok_s_theirs']:7.1f} {r['tok_s'] / r['tok_s_theirs']:5.2f}x "
            f"{r['mem']:6.2f} {r['mem_theirs']:6.2f} {r['mem'] / r['mem_theirs']:5.2f} "
            f"{r['val']:6.3f} {r['val_theirs']:6.3f} {r['val'] - r['val_theirs']:+6.3f} "
            f"{r['val_own_scoring']:6.3f} {r['val_theirs_own']:6.3f} "
            f"{r['val_own_scoring'] - r['val_theirs_own']:+6.3f} {100 * r['mfu']:5.1f}%"
        )
    print(
        "ckpt: gradient checkpointing ours/mlx_lm. val: both adapters scored with our loss (the "
        "answer and its end-of-turn token); val*: with mlx-lm's own (which also counts the "
        "newline after the end-of-turn token and one padding token). MFU = 4·N·tokens / time / "
        "roofline. Targets with defaults: speed >= 1.5x, memory <= 0.6, val diff within ±0.02."
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--mode",
        choices=["train", "generate"],
        default="train",
        help="generate: chat generation tokens/s vs mlx_lm.generate (runs "
        "scripts/bench_generate.py)",
    )
    p.add_argument("payload", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--model",
        action="append",
        help="repeatable: bench (the generated wide-vocabulary model, --hidden/--layers), "
        "smollm2-135m (the real model, from its GGUF), qwen2.5-0.5b (its shape, random weights), "
        "or a model folder, .gguf file or hub id (default: bench)",
    )
    p.add_argument(
        "--settings",
        default="defaults,off",
        help="comma-separated: defaults (each tool's own: ours auto checkpointing, mlx_lm.lora "
        "off), off, on (gradient checkpointing in both)",
    )
    p.add_argument(
        "--reduced",
        action="store_true",
        help="CI size: bench model hidden 256, 4 layers, 32 examples, 1 repeat, defaults only",
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument(
        "--examples", type=int, default=100, help="training examples taken from huanhuan.json"
    )
    p.add_argument("--valid", type=int, default=50, help="validation examples")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="optimizer steps (default: one epoch = examples / batch)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=4.0, help="effective LoRA scale (our alpha / r)")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall clock, or by process CPU time (with OPENBLAS_NUM_THREADS=1: the "
        "work done, robust on a shared machine)",
    )
    p.add_argument("--checkpointing", action="store_true", help="same as --settings on (old flag)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="keep the model in bf16 (mlx_lm.lora then computes in bf16; ours in fp32 on a CPU)",
    )
    p.add_argument(
        "--seed-python",
        help="python with torch + peft + transformers to also time the seed's own stack",
    )
    p.add_argument(
        "--blas", action="store_true", help="also time ours with the wheel's bundled BLAS (Linux)"
    )
    return p.parse_args()


def extras(model: Path, res: dict, args, env: dict, tmp: Path) -> None:
    """The seed's own stack and the bundled-BLAS figure, when asked for."""
    common, tokens = res["common"], res["tokens"]
    ours = res["rows"][0]["tok_s"]
    seed_py = seed_stack_python(args.seed_python)
    if seed_py:
        env_seed = {k: v for k, v in env.items() if k != "LD_PRELOAD"}  # torch brings its BLAS
        run = run_worker(
            "seed", {**common, "checkpointing": False, "out": str(tmp / "seed")}, env_seed, seed_py
        )
        seed_tps = tokens / run["seconds"]
        print(
            f"seed stack      transformers Trainer + PEFT {seed_tps:,.0f} tok/s   ours/seed "
            f"{ours / seed_tps:.2f}x   val {run['val_loss']:.4f}"
        )
    elif args.seed_python is None and args.blas:
        print("seed stack      skipped: pass --seed-python PY (an interpreter with torch + peft)")
    if args.blas and sys.platform == "linux":
        env_ref = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        env_ref["MLX_LORA_NO_OPENBLAS"] = "1"
        slow = run_worker(
            "ours", {**common, "checkpointing": None, "out": str(tmp / "ours-refblas")}, env_ref
        )
        slow_tps = slow["tokens"] / slow["seconds"]
        print(
            f"bundled BLAS    ours {slow_tps:,.0f} tok/s   OpenBLAS speed-up "
            f"{ours / slow_tps:.1f}x  (target >= 10)"
        )


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.payload))))
        return
    if args.mode == "generate":
        extra = ["--repeats", "2", "--max-tokens", "64"] if args.reduced else []
        raise SystemExit(
            subprocess.call(
                [sys.executable, str(REPO / "scripts" / "bench_generate.py"), *extra], cwd=REPO
            )
        )
    args.settings = ["on"] if args.checkpointing else args.settings.split(",")
    if args.reduced:
        args.hidden, args.layers, args.examples, args.valid, args.repeats = 256, 4, 32, 16, 1
        args.settings = ["defaults"]
    args.steps = args.steps or args.examples // args.batch
    models = args.model or ["bench"]
    qwen = {"bench", "qwen2.5-0.5b"} & set(models)
    if not HUANHUAN.is_file() or (qwen and not QWEN_TOKENIZER.is_dir()):
        print(f"skipped: needs {QWEN_TOKENIZER} and {HUANHUAN}")
        return
    from mlx_lora.core.blas import relaunch_env
    from mlx_lora.testing.bench import prepare_model

    env = relaunch_env() or os.environ.copy()  # both tools with the same (fast) BLAS
    recs = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    results = {}
    for spec in models:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            tmp = Path(tmp)
            (tmp / "train.json").write_text(
                json.dumps(recs[: args.examples], ensure_ascii=False), encoding="utf-8"
            )
            (tmp / "valid.json").write_text(
                json.dumps(recs[args.examples : args.examples + args.valid], ensure_ascii=False),
                encoding="utf-8",
            )
            model = prepare_model(spec, tmp, args, qwen_tokenizer=QWEN_TOKENIZER)
            print(f"== {spec}", flush=True)
            results[spec] = bench_model(model, args, env, tmp)
            report(spec, results[spec], args)
            extras(model, results[spec], args, env, tmp)
    if len(results) > 1:
        print("\n== summary (defaults: each tool's own settings)")
        for spec, res in results.items():
            for r in res["rows"]:
                print(
                    f"{spec:14s} {r['setting']:9s} speed {r['tok_s'] / r['tok_s_theirs']:.2f}x  "
                    f"memory {r['mem'] / r['mem_theirs']:.2f}  "
                    f"val {r['val'] - r['val_theirs']:+.3f} "
                    f"(mlx-lm scoring {r['val_own_scoring'] - r['val_theirs_own']:+.3f})  "
                    f"MFU {100 * r['mfu']:.1f}%"
                )


if __name__ == "__main__":
    main()
