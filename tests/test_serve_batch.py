"""Serve for many clients: batched answers equal single ones, and limits one client cannot break.

Every answer decodes in one batched engine (continuous batching); each greedy answer must be the
one the client would get alone. A prompt longer than the context is a 400 naming both numbers,
``max_tokens`` is capped by the context, a client that hangs up frees its slot at once, the
wall-time, body-size and API-key limits hold, and no malformed body gets a 500.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CHAT_PROMPTS

from mlx_lora.infer.generate import PromptTooLong, complete, generate_answer
from mlx_lora.infer.serve import Limits, make_server
from mlx_lora.model.load import load_for_inference
from mlx_lora.plan.memory import SERVE_MAX_CONCURRENCY, serve_concurrency

NAME = "tiny"
PROMPTS = [
    *CHAT_PROMPTS,
    [{"role": "user", "content": "Write a long story about the emperor and his garden."}],
]
TOKENS = 16
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


@pytest.fixture(scope="module")
def alone(loaded) -> list:
    """Each prompt's greedy answer, generated alone (before a server's worker owns the model)."""
    return [complete(loaded, m, temperature=0, max_tokens=TOKENS) for m in PROMPTS]


def _serve(loaded, **limits):
    srv = make_server(loaded, port=0, model_name=NAME, quiet=True, limits=Limits(**limits))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def server(loaded, alone):
    srv, thread = _serve(loaded, max_concurrency=4, request_timeout=3, api_key=KEY)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=30)


def post(port: int, body, *, key: str | None = KEY, raw: bytes | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", "/v1/chat/completions", body=data, headers=headers)
        r = conn.getresponse()
        payload = r.read()
        if body is not None and body.get("stream") and r.status == 200:
            return r.status, payload.decode()
        return r.status, json.loads(payload)
    finally:
        conn.close()


def chat(i: int, max_tokens: int = TOKENS, **kw) -> dict:
    return {
        "model": NAME,
        "messages": PROMPTS[i % len(PROMPTS)],
        "temperature": 0,
        "max_tokens": max_tokens,
        **kw,
    }


def streamed_text(sse: str) -> tuple[str, str | None]:
    text, finish = "", None
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            for c in event.get("choices", []):
                text += c["delta"].get("content") or ""
                finish = c["finish_reason"] or finish
    return text, finish


def _wait_idle(srv, seconds: float) -> float:
    t0 = time.monotonic()
    while srv.worker.active and time.monotonic() - t0 < seconds:
        time.sleep(0.02)
    return time.monotonic() - t0


def test_batched_greedy_answers_equal_the_answers_alone(server, alone):
    port = server.server_address[1]
    n = 3 * len(PROMPTS)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: post(port, chat(i, stream=i % 2 == 1)), range(n)))
    for i, (status, data) in enumerate(results):
        assert status == 200
        want = alone[i % len(PROMPTS)]
        if i % 2:
            assert streamed_text(data) == (want.text, want.finish_reason)
        else:
            assert data["choices"][0]["message"]["content"] == want.text
            assert data["usage"]["completion_tokens"] == want.completion_tokens


def test_several_decode_together(server):
    """The batch really holds several answers at once (not a FIFO in disguise)."""
    port = server.server_address[1]
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len(server.worker.active))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: post(port, chat(i, max_tokens=48)), range(4)))
    stop.set()
    watcher.join()
    assert max(seen) >= 2


def test_kv_cache_is_reused_across_a_conversation(server):
    port = server.server_address[1]
    messages = [{"role": "user", "content": "Tell me about the palace garden, please."}]
    status, first = post(port, {"model": NAME, "messages": messages, "max_tokens": 8})
    assert status == 200
    messages += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And then?"},
    ]
    status, second = post(port, {"model": NAME, "messages": messages, "max_tokens": 8})
    assert status == 200
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= (
        first["usage"]["prompt_tokens"] - 1
    )


def test_prompt_longer_than_the_context_is_a_400_naming_both(tiny_model):
    small = load_for_inference(str(tiny_model))
    small.config["max_position_embeddings"] = 40
    with pytest.raises(PromptTooLong, match=r"\d+ tokens, but the model's context is 40"):
        generate_answer(small, [{"role": "user", "content": "word " * 100}])
    srv, thread = _serve(small)
    try:
        port = srv.server_address[1]
        body = {"messages": [{"role": "user", "content": "word " * 100}]}
        status, data = post(port, body, key=None)
        assert status == 400 and "context is 40 tokens" in data["error"]["message"]
        assert data["error"]["param"] == "messages"
        # max_tokens beyond the context is capped: prompt + answer ≤ 40
        body = {"messages": PROMPTS[0], "max_tokens": 1_000_000_000, "temperature": 0}
        status, data = post(port, body, key=None)
        assert status == 200
        usage = data["usage"]
        assert usage["total_tokens"] <= 40
        if data["choices"][0]["finish_reason"] == "length":
            assert usage["total_tokens"] == 40
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)


def _hang_up(port: int, stream: bool) -> None:
    body = json.dumps(chat(5, max_tokens=1_000_000, stream=stream)).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:
        assert s.recv(64)  # the answer has started
    else:
        time.sleep(0.3)
    s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_hanging_up_frees_its_slot(server, alone, stream):
    port = server.server_address[1]
    _hang_up(port, stream)
    assert _wait_idle(server, 1.0) < 1.0, "the abandoned answer still decodes"
    t0 = time.monotonic()
    status, data = post(port, chat(0))
    assert status == 200 and data["choices"][0]["message"]["content"] == alone[0].text
    assert time.monotonic() - t0 < 5


def test_request_timeout_ends_the_answer(server):
    port = server.server_address[1]
    t0 = time.monotonic()
    status, data = post(port, chat(5, max_tokens=1_000_000))
    took = time.monotonic() - t0
    assert status == 200 and 2.5 < took < 6
    assert data["choices"][0]["finish_reason"] == "length"


def test_api_key(server):
    port = server.server_address[1]
    for key in (None, "wrong"):
        status, data = post(port, chat(0), key=key)
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 401
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert post(port, chat(0))[0] == 200


MALFORMED = {
    "deep-nesting": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep-objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "lone-surrogate": b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
    "surrogate-in-stop": b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}',
    "huge-number": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
    + b"9" * 5000
    + b"}",
    "content-number": b'{"messages": [{"role": "user", "content": 5}]}',
    "messages-object": b'{"messages": {"role": "user"}}',
    "max-tokens-string": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}',
    "stream-string": b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    "temperature-list": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": [1]}',
    "model-list": b'{"model": [1], "messages": [{"role": "user", "content": "hi"}]}',
    "not-utf8": b'{"messages": "\xff\xfe"}',
    "top-level-array": b"[1, 2]",
    "nan": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_bodies_get_a_json_4xx(server, name):
    port = server.server_address[1]
    status, data = post(port, None, raw=MALFORMED[name])
    assert 400 <= status < 500, data
    assert data["error"]["message"] and "\n" not in data["error"]["message"]
    assert post(port, chat(0, max_tokens=2))[0] == 200


def test_body_size_limit(loaded, alone):
    srv, thread = _serve(loaded, max_body=2000)
    try:
        port = srv.server_address[1]
        body = {"messages": [{"role": "user", "content": "x" * 5000}]}
        status, data = post(port, body, key=None)
        assert status == 413 and "limit of 2000 bytes" in data["error"]["message"]
        assert post(port, chat(0, max_tokens=2), key=None)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)


def test_32_clients_streaming_plain_and_hanging_up(server, alone):
    port = server.server_address[1]

    def client(i: int):
        if i % 4 == 3:
            _hang_up(port, stream=i % 8 == 7)
            return None
        return post(port, chat(i, stream=i % 2 == 1), timeout=120)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    for i, r in enumerate(results):
        if r is None:
            continue
        status, data = r
        want = alone[i % len(PROMPTS)]
        assert status == 200
        text = streamed_text(data)[0] if i % 2 else data["choices"][0]["message"]["content"]
        assert text == want.text
    assert _wait_idle(server, 1.0) < 1.0
    assert post(port, chat(1))[1]["choices"][0]["message"]["content"] == alone[1].text


def test_default_concurrency_from_the_memory_plan(loaded):
    n, why = serve_concurrency(loaded.config, 4, 32768)
    assert 1 <= n <= SERVE_MAX_CONCURRENCY and "KV cache per 4096-token conversation" in why
    big = {"num_hidden_layers": 80, "num_attention_heads": 64, "hidden_size": 8192}
    assert serve_concurrency(big, 4, 1 << 20)[0] <= n


# ------------------------------------------------------------------ several adapters on one base


@pytest.fixture(scope="module")
def two_adapters(tiny_model, tmp_path_factory) -> dict:
    from test_chat import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_model, root / "alpha", seed=1),
        "beta": make_adapter(tiny_model, root / "beta", seed=2, system_prompt="You are Beta."),
    }


def test_mixed_adapters_in_one_batch_each_answer_as_served_alone(tiny_model, two_adapters):
    from mlx_lora.infer.serve import adapter_specs
    from mlx_lora.model.load import load_adapter_set

    # what a serve of each adapter alone answers (the single-adapter path: load_for_inference)
    want = {}
    for name, folder in two_adapters.items():
        single = load_for_inference(str(tiny_model), folder)
        want[name] = [complete(single, m, temperature=0, max_tokens=TOKENS) for m in PROMPTS]
    base = load_for_inference(str(tiny_model))
    want["tiny"] = [complete(base, m, temperature=0, max_tokens=TOKENS) for m in PROMPTS]
    assert want["alpha"][0].text != want["beta"][0].text  # the adapters do differ

    specs = adapter_specs([f"{n}={d}" for n, d in two_adapters.items()])
    bank = load_adapter_set(str(tiny_model), specs)
    srv = make_server(bank, port=0, quiet=True, limits=Limits(max_concurrency=6))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.server_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models")
        listed = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]
        conn.close()
        assert listed == ["alpha", "beta", "tiny"]
        jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("alpha", "beta", "tiny")]

        def ask(job):
            name, i = job
            return post(port, {**chat(i, stream=i % 2 == 1), "model": name}, key=None)

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(ask, jobs))
        for (name, i), (status, data) in zip(jobs, results, strict=True):
            assert status == 200
            text = streamed_text(data)[0] if i % 2 else data["choices"][0]["message"]["content"]
            assert text == want[name][i].text, (name, i)
        status, data = post(port, {**chat(0), "model": "gamma"}, key=None)
        assert status == 400 and "'alpha', 'beta', 'tiny'" in data["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)


def test_adapter_specs():
    from mlx_lora.core.errors import MlxLoraError
    from mlx_lora.infer.serve import adapter_specs

    assert adapter_specs(None) == {}
    assert list(adapter_specs(["runs/a"])) == [""]
    assert list(adapter_specs(["a=runs/a", "b=runs/b"])) == ["a", "b"]
    with pytest.raises(MlxLoraError, match="name each"):
        adapter_specs(["runs/a", "b=runs/b"])
    with pytest.raises(MlxLoraError, match="given twice"):
        adapter_specs(["a=runs/a", "a=runs/b"])


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--max-concurrency", "-1"], "--max-concurrency must be 0 (auto) or positive"),
        (["--request-timeout", "-5"], "--request-timeout must be 0 (none) or positive"),
        (["--max-body-size", "lots"], "is not a size"),
        (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
    ],
)
def test_bad_limit_flags_fail_before_loading(tiny_model, flags, needle):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.serve", "--model", str(tiny_model), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and needle in r.stderr, r.stderr
