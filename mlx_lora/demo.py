"""``python -m mlx_lora.demo``: the whole pipeline, offline, on a tiny local model, in seconds.

It is the README's "does my install work" command: a tiny Qwen2-architecture model is built with
:mod:`mlx_lora.testing.tiny_model`, trained for a few steps on ``dataset/huanhuan.json``,
asked one question, fused, written as a GGUF with a Modelfile, handed to ``ollama create`` when
Ollama is installed, and verified (GGUF read back; tokenization and logits in llama.cpp when
llama-cpp-python is installed). The model is random and tiny, so its answer is gibberish: what
matters is that every stage runs and that the verify figures agree.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.config import TrainConfig, opt, parse_config
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import read_records
from mlx_lora.export.pipeline import ExportConfig, export, summary
from mlx_lora.gguf.llamacpp import INSTALL_HINT, have_llama_cpp
from mlx_lora.gguf.writer import GGUF_TYPES
from mlx_lora.infer.generate import complete
from mlx_lora.model.load import load_for_inference
from mlx_lora.ollama.modelfile import ollama_create
from mlx_lora.testing import SAMPLE_DATA
from mlx_lora.testing.tiny_model import make_tiny_model
from mlx_lora.train.loop import train
from mlx_lora.verify.checks import verify_export

MARKER = ".mlx_lora_demo"
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
QUESTION = "你是谁？"
DEMO_NAME = "mlx-lora-demo"
STAGES = 6


@dataclass
class DemoConfig:
    output_dir: str = opt(
        "runs/demo", "folder for everything the demo writes (replaced on a rerun)"
    )
    steps: int = opt(150, "training steps")
    learning_rate: float = opt(3e-3, "learning rate (high: the tiny model must learn in seconds)")
    gguf_type: str = opt(
        "f32",
        "GGUF type of the export (f32 makes the verify figures exact)",
        choices=list(GGUF_TYPES),
    )
    ollama: bool = opt(True, "run `ollama create` when ollama is on PATH")


IDENTITY = ("你是谁？",)


def demo_dataset(out: Path) -> Path:
    """The identity lines of the packaged sample (``dataset/huanhuan.json``): few enough that a
    tiny random model learns
    them in seconds, so the chat stage shows a fine-tune that visibly worked."""
    path = SAMPLE_DATA
    if not path.is_file():
        raise MlxLoraError(f"{path} is missing: reinstall mlx_lora (the sample ships with it)")

    records = [
        r for r in read_records(path) if isinstance(r, dict) and r.get("instruction") in IDENTITY
    ]
    if not records:
        raise MlxLoraError(
            f"{path} has no identity records ({', '.join(IDENTITY)}); reinstall mlx_lora"
        )
    subset = out / "identity.json"
    subset.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return subset


def prepare_dir(out: Path) -> None:
    """Use ``out`` if it is new, empty or an earlier demo's folder; never wipe anything else."""
    if out.exists() and not out.is_dir():
        raise MlxLoraError(f"--output-dir {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise MlxLoraError(
                f"--output-dir {out} holds files the demo did not write; pass an empty or new "
                "folder"
            )
        for child in out.iterdir():
            if child.name != MARKER:
                shutil.rmtree(
                    child
                ) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "written by python -m mlx_lora.demo; rerunning the demo replaces this folder\n",
        encoding="utf-8",
    )


class Stages:
    """Numbered stage headers with wall time, so a human sees where the minute goes."""

    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        print(f"\n[{self.n}/{STAGES}] {title}", flush=True)
        t = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t
        self.times[title] = dt
        print(f"    ({dt:.1f} s)", flush=True)
        return value

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def _train(cfg: DemoConfig, model_dir: Path, data: Path, adapter: Path) -> Any:

    tcfg = TrainConfig(
        model=str(model_dir),
        data=str(data),
        output_dir=str(adapter),
        max_steps=cfg.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate,
        warmup_steps=0,
        logging_steps=max(1, cfg.steps // 4),
        save_steps=max(cfg.steps, 1),
        max_seq_length=256,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        system_prompt=SYSTEM_PROMPT,
        gradient_checkpointing=False,
        seed=0,
    )
    return train(tcfg, progress=False)


def _chat(model_dir: Path, adapter: Path) -> str:

    loaded = load_for_inference(str(model_dir), adapter)
    answer = complete(
        loaded, [{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0.0
    )
    print(
        f"    system: {SYSTEM_PROMPT}\n    user:   {QUESTION}\n    model:  {answer.text.strip()!r}"
    )
    print(f"    {answer.stats()}")
    return answer.text


def _export(cfg: DemoConfig, model_dir: Path, adapter: Path, out: Path) -> Any:

    ecfg = ExportConfig(
        model=str(model_dir),
        adapter=str(adapter),
        output_dir=str(out / "export"),
        gguf_type=cfg.gguf_type,
        name=DEMO_NAME,
    )
    r = export(ecfg, progress=False, log=False)
    t = r.timings
    print(f"    fused HF folder  {r.fused_dir}  ({t.get('fuse', 0):.1f} s)")
    print(f"    GGUF ({r.gguf_type})      {r.gguf}  ({t.get('gguf', 0):.1f} s)")
    print(f"    Modelfile        {r.modelfile}")
    keep = ("FROM", "ADAPTER", "SYSTEM", "PARAMETER")
    for line in r.modelfile.read_text(encoding="utf-8").splitlines():
        if line.startswith(keep):
            print(f"      {line}")
    return r


def _verify(result: Any) -> Any:

    if not have_llama_cpp():
        print(f"    llama-cpp-python is not installed: llama.cpp checks skipped ({INSTALL_HINT})")
    report = verify_export(result)
    print("\n".join("    " + line for line in report.table().splitlines()))
    return report


def _ollama(cfg: DemoConfig, result: Any, report: Any) -> bool:

    if not cfg.ollama:
        print("    skipped (--no-ollama)")
        return False
    if shutil.which("ollama") is None:
        print(
            "    ollama is not on PATH: skipped (with Ollama installed: ollama create "
            f"{DEMO_NAME} -f {result.modelfile})"
        )
        return False
    if not report.ok:
        print("    skipped: verification failed")
        return False
    try:
        ollama_create(DEMO_NAME, result.modelfile)
    except MlxLoraError as e:  # a stopped Ollama server should not fail the install check
        print(f"    ollama create failed: {e}")
        return False
    print(f"    created; try: ollama run {DEMO_NAME}")
    return True


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Every stage in order; returns the artifacts and figures (tests read them)."""

    if cfg.steps < 1:
        raise MlxLoraError(f"--steps must be at least 1, got {cfg.steps}")
    out = Path(cfg.output_dir)
    prepare_dir(out)
    data = demo_dataset(out)
    stages = Stages()
    print(f"mlx_lora demo → {out.resolve()}")
    model_dir = stages.run(
        "tiny model (Qwen2 architecture, trained BPE tokenizer, ChatML template)",
        lambda: make_tiny_model(out / "tiny-model", init="fan_in").resolve(),
    )
    print(f"    {model_dir}")
    adapter = out / "adapter"
    stages.run(
        f"LoRA training: {cfg.steps} steps on the identity lines of dataset/huanhuan.json",
        lambda: _train(cfg, model_dir, data, adapter),
    )
    answer = stages.run(
        "one chat answer (greedy): the tiny model has learned who it is",
        lambda: _chat(model_dir, adapter),
    )
    result = stages.run(
        "export: fuse → GGUF → Modelfile (TEMPLATE derived from the chat template)",
        lambda: _export(cfg, model_dir, adapter, out),
    )
    report = stages.run(
        "verify: GGUF vs HF folder, llama.cpp vs MLX, fused vs base+adapter",
        lambda: _verify(result),
    )
    result.ollama_created = stages.run("ollama create", lambda: _ollama(cfg, result, report))
    print("\nartifacts:")
    print(f"  tiny model         {model_dir}")
    print(f"  adapter            {adapter.resolve()}  (PEFT adapter, trainer_state.json, loss.png)")
    print("\n".join(summary(result).splitlines()[1:]))
    verdict = "OK: every stage ran and the export matches the model"
    if not report.ok:
        verdict = "FAILED: the export does not match the model"
    print(f"\n{verdict} (total {stages.total:.1f} s)")
    return {
        "model_dir": model_dir,
        "adapter": adapter,
        "export": result,
        "report": report,
        "answer": answer,
        "times": stages.times,
        "total": stages.total,
    }


DESCRIPTION = """Run the whole pipeline offline on a tiny local model: build it, train a few
LoRA steps on dataset/huanhuan.json, chat once, fuse, write a GGUF and a Modelfile, verify, and
create the Ollama model when Ollama is installed. The "does my install work" command."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg: DemoConfig = parse_config(DemoConfig, argv, "python -m mlx_lora.demo", DESCRIPTION)
    result = run_demo(cfg)
    if not result["report"].ok:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    from mlx_lora.core.cli import run

    sys.exit(run(main))
