"""``python -m mlx_lora.eval``: did the fine-tune help? Base vs tuned, on the same held-out data.

The seed judged its result by reading a few answers. Here the tuned model and its base are scored
on the same held-out examples with the training loss itself (same rendering, same loss mask, same
packing: :func:`mlx_lora.train.loss.evaluate`), and answer the same prompts greedily side by side.
Only
one copy of the weights is loaded: the base is the tuned model with its LoRA layers switched off.
Results go to ``eval.json`` (figures), ``eval.md`` and a self-contained ``eval.html``.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.config import opt
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import write_json_atomic, write_text_atomic
from mlx_lora.data.dataset import (
    Dataset,
    detect_format,
    load_dataset,
    read_records,
    split,
    to_messages,
)
from mlx_lora.data.preference import load_preference, preferred_answers
from mlx_lora.infer.generate import check_max_tokens, complete
from mlx_lora.model.hub import SOURCES
from mlx_lora.model.load import load_for_inference
from mlx_lora.model.lora import Adapter, read_adapter, set_active
from mlx_lora.model.meta import training_system_prompt
from mlx_lora.train.loss import evaluate, training_path

EVAL_JSON = "eval.json"  # the figures (EvalResult.as_dict)
EVAL_MD = "eval.md"
EVAL_HTML = "eval.html"


@dataclass
class EvalConfig:
    adapter: str | None = opt(None, "the training run's --output-dir (or one of its checkpoints)")
    model: str | None = opt(None, "base model; default: the one the adapter records")
    data: str | None = opt(
        None, "held-out data (any training format); default: the run's own validation split"
    )
    prompts: str | None = opt(
        None,
        "prompts to answer side by side: a .txt file (one per line) or a dataset file; default: "
        "the first validation questions",
    )
    num_prompts: int = opt(5, "how many prompts to answer")
    max_tokens: int = opt(128, "answer length limit")
    batch_size: int = opt(4, "examples per loss batch")
    output_dir: str | None = opt(
        None, "where eval.json, eval.md, eval.html go (default: --adapter)"
    )
    model_source: str = opt("auto", "where a model id is fetched from", choices=list(SOURCES))


@dataclass
class EvalResult:
    """The figures and answers of one evaluation (what ``eval.json`` holds)."""

    adapter: str
    base_model: str
    data: str
    examples: int
    target_tokens: int
    base_loss: float
    tuned_loss: float
    answers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def base_perplexity(self) -> float:
        return math.exp(min(self.base_loss, 700))

    @property
    def tuned_perplexity(self) -> float:
        return math.exp(min(self.tuned_loss, 700))

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "base_perplexity": self.base_perplexity,
            "tuned_perplexity": self.tuned_perplexity,
        }


def _held_out(adapter: Adapter, data: str | None, tokenizer: Any) -> tuple[str, list, list]:
    """The examples to score (and their conversations): ``data``, else the run's own split."""
    rec = adapter.extra
    kw = {
        "fmt": rec.get("format") or "auto",
        "system_prompt": training_system_prompt(None, adapter),
        "max_seq_length": rec.get("max_seq_length") or 2048,
        "allow_special": bool(rec.get("allow_special_tokens_in_content")),  # as it was trained
    }
    if data is None and rec.get("eval_data"):
        data = rec["eval_data"]
    if data is not None:
        ds = _load(Path(data), tokenizer, rec.get("method") or "sft", kw)
        return (str(data), *_scored(rec, ds.examples, ds.sources))
    if not rec.get("data") or not rec.get("val_split"):
        raise MlxLoraError(
            f"{adapter.directory} records no validation split (trained without --val-split or "
            "--eval-data, or by an older mlx_lora); pass --data FILE with held-out examples"
        )
    ds = _load(Path(rec["data"]), tokenizer, rec.get("method") or "sft", kw)
    _, val = split(len(ds.examples), float(rec["val_split"]), int(rec.get("seed", 42)))
    return (
        f"{rec['data']} (validation split {rec['val_split']})",
        *_scored(rec, [ds.examples[i] for i in val], [ds.sources[i] for i in val]),
    )


def _load(path: Path, tokenizer: Any, method: str, kw: dict) -> Dataset:
    """The file as the run read it: SFT examples, or (``--method dpo`` …) its preference items."""
    if method == "sft":
        return load_dataset(path, tokenizer, **kw)
    return load_preference(path, tokenizer, method, **kw)


def _scored(rec: dict, examples: list, sources: list) -> tuple[list, list]:
    """What is scored: the examples themselves (SFT), or the preferred answers of preference
    items (chosen / desirable: the loss on them should fall)."""
    if (rec.get("method") or "sft") == "sft":
        return examples, sources
    examples, sources = preferred_answers(examples, sources)
    if not examples:
        raise MlxLoraError("the held-out data has no chosen or desirable answers to score")
    return examples, sources


def _questions(prompts: str | None, sources: list, n: int) -> list[list[dict]]:
    """Conversations to answer: each held-out conversation up to its last user turn, or the
    prompts of a file (``.txt``: one per line; else any training format)."""
    convs: list[list[dict]] = []
    if prompts is not None:
        path = Path(prompts)
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise MlxLoraError(f"--prompts {path} not found")
            lines = path.read_text(encoding="utf-8").splitlines()
            convs = [[{"role": "user", "content": t.strip()}] for t in lines if t.strip()]
        else:
            records = read_records(path)
            fmt = detect_format(records, path)
            sources = [to_messages(r, fmt) for r in records]
    if not convs:
        for msgs in sources:
            if isinstance(msgs, list) and any(m["role"] == "user" for m in msgs):
                last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
                convs.append(msgs[: last + 1])
    if not convs:
        raise MlxLoraError("no prompts to answer: pass --prompts FILE (a .txt, one per line)")
    return convs[:n]


def _answers(loaded: Any, convs: list[list[dict]], max_tokens: int) -> list[dict]:
    """Greedy answers of the tuned model and of its base (LoRA switched off), side by side."""

    out = []
    for conv in convs:
        row = {"prompt": conv[-1]["content"], "history": conv[:-1]}
        for name, active in (("tuned", True), ("base", False)):
            set_active(loaded.model, active)
            try:
                row[name] = complete(loaded, conv, max_tokens=max_tokens, temperature=0.0).text
            finally:
                set_active(loaded.model, True)
        out.append(row)
    return out


def evaluate_adapter(cfg: EvalConfig) -> EvalResult:
    """Score base and tuned on the held-out examples, answer the prompts, write the reports."""

    if cfg.adapter is None:
        raise MlxLoraError("pass --adapter OUT (the --output-dir of a training run)")
    check_max_tokens(cfg.max_tokens, "--max-tokens")
    if cfg.num_prompts < 0 or cfg.batch_size < 1:
        raise MlxLoraError("--num-prompts must be >= 0 and --batch-size >= 1")
    t0 = time.perf_counter()
    adapter = read_adapter(Path(cfg.adapter))
    loaded = load_for_inference(cfg.model, adapter.directory, source=cfg.model_source)
    data, examples, sources = _held_out(adapter, cfg.data, loaded.tokenizer)
    max_len = int(adapter.extra.get("max_seq_length") or 2048)
    pad = loaded.tokenizer.pad_token_id or 0
    path = training_path(loaded.config.get("model_type"))
    tuned = evaluate(loaded.model, examples, cfg.batch_size, max_len, True, pad, path=path)
    set_active(loaded.model, False)
    try:
        base = evaluate(loaded.model, examples, cfg.batch_size, max_len, True, pad, path=path)
    finally:
        set_active(loaded.model, True)
    answers = []
    if cfg.num_prompts:
        answers = _answers(
            loaded, _questions(cfg.prompts, sources, cfg.num_prompts), cfg.max_tokens
        )
    result = EvalResult(
        adapter=str(adapter.directory.resolve()),
        base_model=str(loaded.model_dir),
        data=data,
        examples=len(examples),
        target_tokens=sum(sum(e.mask[1:]) for e in examples),
        base_loss=base,
        tuned_loss=tuned,
        answers=answers,
        seconds=round(time.perf_counter() - t0, 2),
    )
    write_reports(result, Path(cfg.output_dir or adapter.directory))
    return result


def markdown(r: EvalResult) -> str:
    """``eval.md``: the figures, then each prompt with both answers."""
    lines = [
        f"# Evaluation of {Path(r.adapter).name}",
        "",
        f"Base model `{r.base_model}`; held-out data: {r.data} ({r.examples} examples, "
        f"{r.target_tokens:,} answer tokens).",
        "",
        "| model | mean token loss | perplexity |",
        "|---|---|---|",
        f"| base | {r.base_loss:.4f} | {r.base_perplexity:.2f} |",
        f"| tuned | {r.tuned_loss:.4f} | {r.tuned_perplexity:.2f} |",
        f"| change | {r.tuned_loss - r.base_loss:+.4f} | "
        f"{100 * (r.tuned_perplexity / r.base_perplexity - 1):+.1f}% |",
        "",
    ]
    for i, a in enumerate(r.answers, 1):
        lines += [f"## {i}. {a['prompt']}", "", "**tuned**", "", a["tuned"], "", "**base**", ""]
        lines += [a["base"], ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .8em}"
    ".pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
    ".pair pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em;border-radius:4px}"
    ".better{color:#0a7d28}.worse{color:#b00020}"
)


def html_report(r: EvalResult) -> str:
    """``eval.html``: one file, no scripts, no fetched resources; every text escaped."""
    e = html.escape
    verdict = "better" if r.tuned_loss < r.base_loss else "worse"
    rows = "".join(
        f"<h3>{i}. {e(a['prompt'])}</h3><div class='pair'><div><b>tuned</b><pre>{e(a['tuned'])}"
        f"</pre></div><div><b>base</b><pre>{e(a['base'])}</pre></div></div>"
        for i, a in enumerate(r.answers, 1)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>mlx_lora eval: {e(Path(r.adapter).name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Evaluation of {e(Path(r.adapter).name)}</h1>"
        f"<p>Base model <code>{e(r.base_model)}</code>; held-out data: {e(r.data)} "
        f"({r.examples} examples, {r.target_tokens:,} answer tokens).</p>"
        "<table><tr><th>model</th><th>mean token loss</th><th>perplexity</th></tr>"
        f"<tr><td>base</td><td>{r.base_loss:.4f}</td><td>{r.base_perplexity:.2f}</td></tr>"
        f"<tr><td>tuned</td><td class='{verdict}'>{r.tuned_loss:.4f}</td>"
        f"<td class='{verdict}'>{r.tuned_perplexity:.2f}</td></tr></table>"
        f"<h2>Answers (greedy)</h2>{rows}</body></html>\n"
    )


def write_reports(r: EvalResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / EVAL_JSON, r.as_dict())
    write_text_atomic(out / EVAL_MD, markdown(r))
    write_text_atomic(out / EVAL_HTML, html_report(r))
