#!/usr/bin/env python
"""Chat generation speed as a ratio to plain ``mlx_lm.generate`` on the same model and prompt.

``mlx_lora.chat`` adds work around mlx-lm (re-rendering the whole conversation with the chat
template, the KV-cache prefix bookkeeping, stop strings, the penalty history); this measures what
that costs. Both sides generate the same number of tokens from the same prompt ids with the same
sampler, alternating A B A B in one process so that machine noise hits both alike. The figure is
end-to-end tokens/s (prompt + generation, wall clock); the target is a ratio >= 0.95.

Usage::

    python scripts/bench_generate.py                       # Qwen-shaped tiny model, Qwen tokenizer
    python scripts/bench_generate.py --model DIR [--adapter OUT] --max-tokens 256 --repeats 7

A last line times the first token of a later turn of a conversation with the KV cache reused versus
recomputed (and checks both give the same token).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlx_lora.data.dataset import read_records
from mlx_lora.testing import SAMPLE_DATA
from mlx_lora.testing.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO.parent / "shared" / "fixtures" / "qwen15-tokenizer"
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
QUESTION = "你是谁？家里还有什么人？请详细说说你进宫以后的事情。"


def _tiny_model(out: Path, hidden: int, layers: int) -> Path:
    tok = QWEN_TOKENIZER if (QWEN_TOKENIZER / "vocab.json").is_file() else None
    if tok is None:
        print(
            "note: ../shared/fixtures/qwen15-tokenizer absent; using the small trained tokenizer",
            file=sys.stderr,
        )
    heads = max(1, hidden // 64)  # Qwen1.5: head_dim 64, as many kv heads as heads
    return make_tiny_model(
        out,
        tokenizer=tok,
        hidden_size=hidden,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        intermediate_size=hidden * 11 // 4,
        seed=0,
    )


def _history(data: Path, turns: int) -> list[dict]:
    """A conversation from the dataset sample: ``turns`` question/answer pairs and one more
    question."""

    records = read_records(data)[10:]
    out: list[dict] = []
    for rec in records[:turns]:
        out.append(
            {"role": "user", "content": (rec["instruction"] + "\n" + rec.get("input", "")).strip()}
        )
        out.append({"role": "assistant", "content": rec["output"]})
    out.append({"role": "user", "content": records[turns]["instruction"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", type=Path, help="model folder (default: build a Qwen-shaped tiny model)"
    )
    ap.add_argument("--adapter", type=Path, help="adapter folder to load on top of --model")
    ap.add_argument("--hidden-size", type=int, default=256, help="tiny model width (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="tiny model depth (default 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="A/B pairs after one warm-up pair")
    args = ap.parse_args(argv)

    from mlx_lora.core.blas import maybe_relaunch

    maybe_relaunch()  # the same BLAS the commands use

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_lora.infer.generate import PromptCache, complete, stop_token_ids
    from mlx_lora.model.load import device_name, load_for_inference
    from mlx_lora.model.prompt import build_prompt

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or _tiny_model(
            Path(tmp) / "tiny-qwen", args.hidden_size, args.layers
        )
        loaded = load_for_inference(str(model_dir), args.adapter)
    model, tok = loaded.model, loaded.tokenizer
    n = args.max_tokens
    messages = [{"role": "user", "content": QUESTION}]
    ids = build_prompt(tok, messages, SYSTEM)
    stop_token_ids(loaded)  # both sides stop on the same ids

    def run_chat() -> tuple[float, int]:
        t = time.perf_counter()
        a = complete(
            loaded,
            messages,
            system_prompt=SYSTEM,
            temperature=0.0,
            repetition_penalty=1.0,
            max_tokens=n,
        )
        return time.perf_counter() - t, a.completion_tokens

    def run_mlx_lm() -> float:
        t = time.perf_counter()
        generate(model, tok, prompt=ids, max_tokens=n, sampler=make_sampler(0.0))
        return time.perf_counter() - t

    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"model {model_dir} ({loaded.config.get('model_type')}, {params / 1e6:.1f}M parameters) "
        f"on {device_name()}, mlx {mx.__version__}"
    )
    print(
        f"prompt {len(ids)} tokens, {n} new tokens, greedy; {args.repeats} A/B pairs after a "
        "warm-up pair"
    )

    run_chat(), run_mlx_lm()  # warm-up (compilation, allocator)
    chat_tps, ref_tps, counts = [], [], set()
    for _ in range(args.repeats):
        dt, k = run_chat()
        chat_tps.append(k / dt)
        counts.add(k)
        ref_tps.append(k / run_mlx_lm())  # same prompt, sampler and stop ids: the same k tokens
    ratios = [a / b for a, b in zip(chat_tps, ref_tps, strict=True)]
    a, b = statistics.median(chat_tps), statistics.median(ref_tps)
    print(f"tokens generated per run: {sorted(counts)}")
    print(
        f"mlx_lora.chat      {a:8.1f} tok/s (median; runs: "
        f"{', '.join(f'{x:.0f}' for x in chat_tps)})"
    )
    print(
        f"mlx_lm.generate    {b:8.1f} tok/s (median; runs: "
        f"{', '.join(f'{x:.0f}' for x in ref_tps)})"
    )
    print(
        f"ratio chat / mlx_lm: {statistics.median(ratios):.3f} (median of the A/B pairs; "
        f"ratio of medians {a / b:.3f}; target >= 0.95)"
    )

    # A later turn of a conversation: with reuse only the new turn is computed before the first
    # token.
    history = _history(SAMPLE_DATA, turns=6)
    cache = PromptCache(model)
    complete(loaded, history[:-2], system_prompt=SYSTEM, temperature=0.0, max_tokens=1, cache=cache)
    reuse_t, fresh_t = [], []
    for _ in range(args.repeats):
        cache.reuse(
            build_prompt(tok, history[:-2], SYSTEM)
        )  # back to "the previous turn is cached"
        t = time.perf_counter()
        r = complete(
            loaded, history, system_prompt=SYSTEM, temperature=0.0, max_tokens=1, cache=cache
        )
        reuse_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        f = complete(loaded, history, system_prompt=SYSTEM, temperature=0.0, max_tokens=1)
        fresh_t.append(time.perf_counter() - t)
        assert r.tokens == f.tokens, "cache reuse changed the answer"
    print(
        f"time to first token, turn {len(history) // 2 + 1} ({r.prompt_tokens} prompt tokens, "
        f"{r.cached_tokens} cached): "
        f"{statistics.median(reuse_t) * 1e3:.0f} ms with reuse vs "
        f"{statistics.median(fresh_t) * 1e3:.0f} ms recomputed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
