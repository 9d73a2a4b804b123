"""Benchmark ``mlx_lora.train`` against ``mlx_lm.lora`` on the same examples, in one run.

A Qwen-shaped model with the real 151,936-entry vocabulary (``make_tiny_model.py`` with the Qwen
tokenizer fixture) is trained by both tools on the same huanhuan examples with the same batch,
steps, learning rate (constant), LoRA rank/targets/effective scale, optimizer (AdamW, no weight
decay, no clipping) and prompt masking. Runs alternate A B A B, each in its own process, and the
script prints ratios from this run only: real (non-pad) tokens/s, peak memory, final validation
loss difference, and our MFU against a matmul roofline measured here too (4·N·tokens FLOPs for a
frozen base). ``--blas`` adds our tokens/s with the wheel's bundled BLAS (Linux CPU path figure).

    # full size (hidden 512, 8 layers, 800 examples, one epoch)
    python scripts/bench_train.py
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
    from mlx_lora.config import TrainConfig
    from mlx_lora.train import train

    res = train(
        TrainConfig(
            model=a["model"],
            data=a["train"],
            eval_data=a["valid"],
            output_dir=a["out"],
            overwrite_output_dir=True,
            max_steps=a["steps"],
            per_device_train_batch_size=a["batch"],
            gradient_accumulation_steps=1,
            learning_rate=a["lr"],
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            lora_r=a["rank"],
            lora_alpha=a["rank"] * a["scale"],
            lora_dropout=0.0,
            target_modules=",".join(TARGETS),
            gradient_checkpointing=a["checkpointing"],
            packing=True,
            logging_steps=max(1, a["steps"] // 4),
            save_steps=10**9,
            eval_steps=a["steps"],
            max_seq_length=a["max_len"],
            seed=a["seed"],
            plot=False,
        ),
        progress=False,
    )
    state = json.loads((Path(a["out"]) / "trainer_state.json").read_text(encoding="utf-8"))
    tokens = state["log_history"][-1]["train_tokens"]
    return {
        "seconds": tokens / res.tokens_per_second,
        "tokens": tokens,
        "peak_memory_gb": res.peak_memory_gb,
        "val_loss": res.eval_loss,
        "targets": state["log_history"][-1]["train_target_tokens"],
    }


def worker_mlx_lm(a: dict) -> dict:
    import types

    import mlx.optimizers  # noqa: F401 - imported by mlx_lm.lora anyway
    from mlx.utils import tree_flatten
    from mlx_lm import lora as mlx_lora_cli
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.utils import load

    class Collect(TrainingCallback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_loss_report(self, info):
            self.train.append(info)

        def on_val_loss_report(self, info):
            self.val.append(info)

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
        grad_checkpoint=a["checkpointing"],
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
    import numpy as np

    np.random.seed(args.seed)
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


def our_val_loss(a: dict, mlx_lm_lora: dict) -> float:
    """mlx-lm's trained adapter scored with our validation loss (its own leaves out the answer's
    end-of-turn token), so both tools' final losses are measured the same way.

    mlx-lm stores ``lora_a`` [in, r] and ``lora_b`` [r, out] with a plain scale; PEFT's A and B are
    their transposes, with alpha = scale · r.
    """
    import mlx.core as mx

    from mlx_lora.data import load_dataset
    from mlx_lora.lora import apply_lora
    from mlx_lora.model import load_base
    from mlx_lora.train import evaluate

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
    """Best fp32 GFLOP/s of the model's own GEMM shapes (tokens × hidden × intermediate, both
    ways)."""
    import mlx.core as mx

    h, inter, t = a["hidden"], a["intermediate"], 512
    best = 0.0
    for m, k, n in ((t, h, inter), (t, inter, h), (t, h, h)):
        x, w = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(x, w)
        for _ in range(3):
            mx.eval(x @ w)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(x @ w)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return {"flops_per_second": best}


def worker_seed(a: dict) -> dict:
    """The seed's own stack: transformers Trainer + PEFT on the CPU (runs only where torch and peft
    exist)."""
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
    """An interpreter with torch + peft + transformers: --seed-python, else this one if it has
    them."""
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
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    return layers * per_layer, v * h, cfg


def main() -> None:
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
        "--reduced",
        action="store_true",
        help="CI size: hidden 256, 4 layers, 64 examples, 1 repeat",
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument(
        "--examples", type=int, default=800, help="training examples taken from huanhuan.json"
    )
    p.add_argument("--valid", type=int, default=100, help="validation examples")
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
        "--checkpointing", action="store_true", help="gradient checkpointing in both tools"
    )
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
    args = p.parse_args()
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
    if args.reduced:
        args.hidden, args.layers, args.examples, args.valid, args.repeats = 256, 4, 64, 16, 1
    args.steps = args.steps or args.examples // args.batch
    if not (QWEN_TOKENIZER.is_dir() and HUANHUAN.is_file()):
        print(f"skipped: needs {QWEN_TOKENIZER} and {HUANHUAN}")
        return

    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_model import make_tiny_model

    from mlx_lora.blas import relaunch_env

    env = relaunch_env() or os.environ.copy()  # both tools with the same (fast) BLAS
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        heads = max(2, args.hidden // 64)
        model = make_tiny_model(
            tmp / "model",
            tokenizer=QWEN_TOKENIZER,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=heads,
            kv_heads=max(1, heads // 2),
            intermediate_size=args.hidden * 11 // 4 // 32 * 32,
        )
        if (
            not args.bf16
        ):  # an fp32 copy: both tools then compute in fp32 (bf16 matmuls crawl on a CPU)
            import mlx.core as mx

            weights = mx.load(str(model / "model.safetensors"))
            mx.save_safetensors(
                str(model / "model.safetensors"),
                {k: v.astype(mx.float32) for k, v in weights.items()},
                metadata={"format": "pt"},
            )
            conf = json.loads((model / "config.json").read_text())
            conf["torch_dtype"] = "float32"
            (model / "config.json").write_text(json.dumps(conf, indent=2))
        n_blocks, n_head, cfg = model_params(model)
        n_params = n_blocks + n_head
        recs = json.loads(HUANHUAN.read_text(encoding="utf-8"))
        (tmp / "train.json").write_text(
            json.dumps(recs[: args.examples], ensure_ascii=False), encoding="utf-8"
        )
        (tmp / "valid.json").write_text(
            json.dumps(recs[args.examples : args.examples + args.valid], ensure_ascii=False),
            encoding="utf-8",
        )
        common = dict(
            model=str(model),
            train=str(tmp / "train.json"),
            valid=str(tmp / "valid.json"),
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            rank=args.rank,
            scale=args.scale,
            checkpointing=args.checkpointing,
            max_len=2048,
            seed=0,
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
        )
        results: dict[str, list[dict]] = {"ours": [], "mlx_lm": []}
        for i in range(args.repeats):
            for kind in ("ours", "mlx_lm"):
                r = run_worker(kind, {**common, "out": str(tmp / f"{kind}-{i}")}, env)
                results[kind].append(r)
                print(
                    f"  run {i + 1} {kind:7s} {r['seconds']:8.2f} s  peak "
                    f"{r['peak_memory_gb']:.3f} GB  val {r['val_loss']:.4f}",
                    flush=True,
                )
        roof = run_worker("roofline", common, env)["flops_per_second"]
        seed_py = seed_stack_python(args.seed_python)
        seed_run = None
        if seed_py:
            env_seed = {
                k: v for k, v in env.items() if k != "LD_PRELOAD"
            }  # torch brings its own BLAS
            seed_run = run_worker("seed", {**common, "out": str(tmp / "seed")}, env_seed, seed_py)
            print(
                f"  seed    {seed_run['seconds']:8.2f} s  val {seed_run['val_loss']:.4f}",
                flush=True,
            )
        slow = None
        if args.blas and sys.platform == "linux":
            env_ref = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            env_ref["MLX_LORA_NO_OPENBLAS"] = "1"
            slow = run_worker("ours", {**common, "out": str(tmp / "ours-refblas")}, env_ref)

    # One epoch each: both tools see every example once, so the real (non-pad) token count is the
    # same; ours counts it exactly (mlx-lm's own counter covers only the masked target tokens).
    tokens = results["ours"][0]["tokens"]
    ours = tokens / statistics.median(r["seconds"] for r in results["ours"])
    theirs = tokens / statistics.median(r["seconds"] for r in results["mlx_lm"])
    mem_o = statistics.median(r["peak_memory_gb"] for r in results["ours"])
    mem_t = statistics.median(r["peak_memory_gb"] for r in results["mlx_lm"])
    val_o, val_t = results["ours"][-1]["val_loss"], results["mlx_lm"][-1]["val_loss"]
    mfu = 4 * n_params * ours / roof
    # what ours really computes: the blocks on every token, the vocabulary head only on targets
    secs = statistics.median(r["seconds"] for r in results["ours"])
    real_flops = 4 * n_blocks * tokens + 4 * n_head * results["ours"][0]["targets"]
    real_mfu = real_flops / secs / roof
    print(
        f"\nmodel: qwen2 hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
        f"{cfg['vocab_size']}, "
        f"{n_params / 1e6:.1f}M params; {args.examples} examples, batch {args.batch}, "
        f"{args.steps} steps, "
        f"gradient checkpointing {'on' if args.checkpointing else 'off'} (both), weights "
        f"{'bf16' if args.bf16 else 'fp32'}"
    )
    print(
        f"tokens/s        ours {ours:,.0f}   mlx_lm.lora {theirs:,.0f}   ratio "
        f"{ours / theirs:.2f}x  (target >= 1.5)"
    )
    print(
        f"peak memory     ours {mem_o:.3f} GB   mlx_lm.lora {mem_t:.3f} GB   ratio "
        f"{mem_o / mem_t:.2f}  (target <= 0.6)"
    )
    print(
        f"val loss        ours {val_o:.4f}   mlx_lm.lora {val_t:.4f}   diff {val_o - val_t:+.4f}  "
        "(target <= +0.02; "
        "both adapters scored with our loss; mlx-lm's own figure "
        f"{results['mlx_lm'][-1]['val_loss_own']:.4f})"
    )
    print(
        f"MFU             {100 * mfu:.1f}% of the measured matmul roofline {roof / 1e9:.1f} "
        "GFLOP/s  (target >= 50%; 4·N·tokens)"
    )
    print(
        f"                {100 * real_mfu:.1f}% counting only the FLOPs ours performs (head on "
        "target tokens only)"
    )
    if seed_run:
        seed_tps = tokens / seed_run["seconds"]
        print(
            f"seed stack      transformers Trainer + PEFT {seed_tps:,.0f} tok/s   ours/seed "
            f"{ours / seed_tps:.2f}x   "
            f"val {seed_run['val_loss']:.4f}"
        )
    else:
        print(
            "seed stack      skipped: torch + peft not importable (pass --seed-python PY for an "
            "interpreter that has them)"
        )
    if slow:
        slow_tps = slow["tokens"] / slow["seconds"]
        print(
            f"bundled BLAS    ours {slow_tps:,.0f} tok/s   OpenBLAS speed-up "
            f"{ours / slow_tps:.1f}x  (target >= 10)"
        )


if __name__ == "__main__":
    main()
