"""The API server under load: 50 concurrent clients, clients that vanish mid-stream, loopback only.

Dify and other front ends open many connections at once. One worker thread owns the model and
answers requests in FIFO order, so every client must get its own complete answer (the greedy
answer chat gives for its prompt, nothing mixed up between clients), a client that disconnects
while its answer streams must not hold up the queue, and the server must keep serving afterwards.
All traffic stays on 127.0.0.1; every socket has a timeout and the test ends by itself.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CHAT_PROMPTS

from mlx_lora.config import parse_config
from mlx_lora.infer.generate import complete
from mlx_lora.infer.serve import ServeConfig, make_server
from mlx_lora.model.load import load_for_inference

pytestmark = pytest.mark.slow

NAME = "tiny"
CLIENTS = 50
MAX_TOKENS = 8
PROMPTS = CHAT_PROMPTS


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


@pytest.fixture(scope="module")
def expected(loaded) -> list[str]:
    """What chat answers each prompt (greedy), computed before the server's worker owns the
    model."""
    return [complete(loaded, m, temperature=0, max_tokens=MAX_TOKENS).text for m in PROMPTS]


@pytest.fixture(scope="module")
def server(loaded, expected):
    srv = make_server(loaded, port=0, model_name=NAME, quiet=True)  # the default host
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=30)


def _body(i: int, stream: bool, max_tokens: int = MAX_TOKENS) -> bytes:
    return json.dumps(
        {
            "model": NAME,
            "messages": PROMPTS[i % len(PROMPTS)],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()


def ask(port: int, i: int, stream: bool) -> dict:
    """One client: a plain or a streaming request; returns status, text, finish reason and
    timings."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=_body(i, stream),
            headers={"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        if not stream:
            data = json.loads(r.read())
            choice = data["choices"][0]
            return {
                "status": r.status,
                "text": choice["message"]["content"],
                "finish": choice["finish_reason"],
                "seconds": time.monotonic() - t0,
            }
        text, finish, done = "", None, False
        for _ in range(10_000):  # bounded: a few dozen events are expected
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: ") :]
            if payload == b"[DONE]":
                done = True
                break
            event = json.loads(payload)
            assert "error" not in event, event
            for c in event["choices"]:
                text += c["delta"].get("content") or ""
                finish = c["finish_reason"] or finish
        return {
            "status": r.status,
            "text": text,
            "finish": finish,
            "done": done,
            "seconds": time.monotonic() - t0,
        }
    finally:
        conn.close()


def vanish(port: int) -> bool:
    """A client that asks for a very long streamed answer, reads one chunk and disconnects."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=_body(0, True, max_tokens=1_000_000),
            headers={"Content-Type": "application/json"},
        )
        r = conn.getresponse()
        first = r.read1(256)
        return r.status == 200 and first.startswith(b"data: ")
    finally:
        conn.close()  # mid-stream: the server finds out at its next write


def test_binds_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1"
    assert parse_config(ServeConfig, [], "serve", "").host == "127.0.0.1"


def test_fifty_concurrent_clients_and_vanishing_ones(server, expected):
    port = server.server_address[1]
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS + 3) as pool:
        quitters = [
            pool.submit(vanish, port)
        ]  # first in the queue: its million tokens would block everyone
        answers = []
        for i in range(CLIENTS):
            answers.append(pool.submit(ask, port, i, stream=i % 2 == 0))
            if i in (20, 40):  # more clients that vanish, queued between the others
                quitters.append(pool.submit(vanish, port))
        results = [f.result(timeout=180) for f in answers]
        assert all(q.result(timeout=180) for q in quitters)
    elapsed = time.monotonic() - t0
    for i, r in enumerate(results):
        assert r["status"] == 200, (i, r)
        assert r["text"] == expected[i % len(PROMPTS)], (i, r)  # its own answer, nothing mixed up
        assert r["finish"] in ("length", "stop")
        if i % 2 == 0:
            assert r["done"], "a stream must end with data: [DONE]"
    slowest = max(r["seconds"] for r in results)
    print(
        f"\n{CLIENTS} clients (25 streaming) + 3 that vanished mid-stream: all answered in "
        f"{elapsed:.2f} s, "
        f"slowest client {slowest:.2f} s"
    )
    # a worker still generating a million tokens for a gone client would take minutes
    assert elapsed < 90

    after = ask(port, 1, stream=False)  # and the server keeps serving
    assert after["status"] == 200 and after["text"] == expected[1]
    assert server.worker.is_alive() and server.worker.jobs.empty()
