#!/usr/bin/env python
"""Serving many clients: ``python -m mlx_lora.serve`` against ``python -m mlx_lm.server``.

Both servers run as child processes on the same model folder, with the same OpenBLAS preloaded
(our serve re-launches itself with it; mlx-lm's server gets the same ``LD_PRELOAD``), one after
the other. For 1, 4 and 8 concurrent clients, each client sends streaming chat requests of
``--tokens`` greedy tokens one after another (every prompt distinct, so neither server answers
from a cached prompt); the table gives aggregate tokens/s, median and p95 request latency, median
time to first token, and ours / mlx-lm's throughput.

Usage::

    python scripts/bench_serve.py             # SmolLM2-135M-Instruct and the Qwen2.5-0.5B shape
    python scripts/bench_serve.py --reduced   # CI: SmolLM2 only, 1 and 8 clients (< 2 min)
    python scripts/bench_serve.py --models DIR --clients 1,2,4,8 --requests 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_lora.core.blas import relaunch_env
from mlx_lora.testing.bench import prepare_model

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO.parent / "shared" / "fixtures" / "qwen15-tokenizer"
TOPICS = ["the palace garden", "a winter night", "the emperor", "tea", "a letter", "the moon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(which: str, model: Path, port: int, concurrency: int) -> subprocess.Popen:
    """One server as a child process; returns once it answers (or raises with its log)."""
    if which == "mlx_lora":
        cmd = ["-m", "mlx_lora.serve", "--model", str(model), "--model-name", "default_model"]
        cmd += ["--max-concurrency", str(concurrency), "--request-timeout", "0"]
    else:
        cmd = ["-m", "mlx_lm.server", "--model", str(model)]
    env = relaunch_env() or dict(os.environ)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, *cmd, "--port", str(port)], env=env, stdout=log, stderr=log
    )
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{which} exited:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{which} did not start within 600 s")


def ask(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    """One streaming greedy request: (time to first token, latency, completion tokens)."""
    body = {
        "model": "default_model",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    r = conn.getresponse()
    ttft, count, pieces = None, None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            count = event["usage"]["completion_tokens"]
        for c in event.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                pieces += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
    conn.close()
    latency = time.perf_counter() - t0
    return ttft if ttft is not None else latency, latency, count if count is not None else pieces


def run_clients(port: int, clients: int, requests: int, tokens: int, salt: str) -> dict:
    """``clients`` threads, each sending ``requests`` requests in a row."""

    def client(c: int) -> list[tuple[float, float, int]]:
        return [
            ask(port, f"[{salt}{c}.{k}] Tell me a story about {TOPICS[(c + k) % 6]}.", tokens)
            for k in range(requests)
        ]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in done)
    return {
        "tok_s": sum(r[2] for r in done) / wall,
        "median": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "ttft": statistics.median(r[0] for r in done),
    }


def bench_model(spec: str, tmp: Path, args) -> list[tuple]:
    model = prepare_model(spec, tmp, args, qwen_tokenizer=QWEN_TOKENIZER)
    results: dict[tuple[str, int], dict] = {}
    for which in ("mlx_lm", "mlx_lora"):
        port = free_port()
        proc = start(which, model, port, max(args.clients))
        try:
            ask(port, "warm up", 4)
            for n in args.clients:
                results[(which, n)] = run_clients(port, n, args.requests, args.tokens, which)
                r = results[(which, n)]
                print(f"{spec} {which} {n} clients: {r['tok_s']:.1f} tok/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return [(spec, n, results[("mlx_lm", n)], results[("mlx_lora", n)]) for n in args.clients]


def table(rows: list[tuple]) -> str:
    out = [
        "| model | clients | mlx_lm.server tok/s | mlx_lora.serve tok/s | ratio | median s "
        "(mlx-lm / ours) | p95 s (mlx-lm / ours) | TTFT s (mlx-lm / ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, n, theirs, ours in rows:
        pair = {k: f"{theirs[k]:.2f} / {ours[k]:.2f}" for k in ("median", "p95", "ttft")}
        out.append(
            f"| {spec} | {n} | {theirs['tok_s']:.1f} | {ours['tok_s']:.1f} | "
            f"{ours['tok_s'] / theirs['tok_s']:.2f}× | {pair['median']} | {pair['p95']} | "
            f"{pair['ttft']} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=3, help="requests per client, in a row")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (default fp32: CPU)")
    p.add_argument("--reduced", action="store_true", help="CI: SmolLM2, 1 and 8 clients, 1 each")
    args = p.parse_args()
    if args.reduced:
        args.models, args.clients, args.requests, args.tokens = "smollm2-135m", "1,8", 1, 24
    args.clients = [int(c) for c in str(args.clients).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for spec in args.models.split(",") for r in bench_model(spec, Path(tmp), args)]
    print(table(rows))


if __name__ == "__main__":
    main()
