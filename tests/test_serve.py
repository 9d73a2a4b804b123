"""The OpenAI-compatible server: the official client gets chat's answers; bad requests get 400s."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.infer.generate import complete
from mlx_lora.infer.serve import make_server
from mlx_lora.model.load import load_for_inference
from mlx_lora.model.prompt import build_prompt

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
NAME = "huanhuan-tiny"
HELLO = [{"role": "user", "content": "你是谁？"}]
OTHER = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me about the palace garden."},
]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    from test_chat import make_adapter

    return make_adapter(tiny_model, tmp_path_factory.mktemp("serve") / "adapter")


@pytest.fixture(scope="module")
def loaded(tiny_model, adapter):
    return load_for_inference(str(tiny_model), adapter)


@pytest.fixture(scope="module")
def expected(loaded) -> dict:
    """What chat answers at temperature 0 (computed before the server's worker owns the model)."""
    return {
        "hello": complete(loaded, HELLO, temperature=0, max_tokens=24),
        "other": complete(loaded, OTHER, temperature=0, max_tokens=24),
    }


@pytest.fixture(scope="module")
def server(loaded, expected):
    srv = make_server(loaded, "127.0.0.1", 0, NAME, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=60)


def _raw(base: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def test_plain_completion_equals_chat(client, expected, loaded):
    r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=24)
    want = expected["hello"]
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason == "length"
    assert r.usage.prompt_tokens == len(build_prompt(loaded.tokenizer, HELLO, loaded.system_prompt))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    assert r.model == NAME and r.id.startswith("chatcmpl-")


def test_streaming_completion_equals_chat(client, expected):
    stream = client.chat.completions.create(
        model=NAME,
        messages=OTHER,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == expected["other"].text
    assert finish == "length"
    assert usage.completion_tokens == 24 and usage.prompt_tokens == expected["other"].prompt_tokens


def test_stop_and_seed(client, expected):
    full = expected["hello"].text
    stop = full[5:8]
    r = client.chat.completions.create(
        model=NAME, messages=HELLO, temperature=0, max_tokens=24, stop=[stop]
    )
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"

    def sample(seed):
        return (
            client.chat.completions.create(
                model=NAME, messages=HELLO, temperature=1.0, max_tokens=16, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_concurrent_clients_are_all_answered(client, expected):
    jobs = [HELLO, OTHER, HELLO, OTHER, HELLO]

    def ask(messages):
        return client.chat.completions.create(
            model=NAME, messages=messages, temperature=0, max_tokens=24
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for messages, r in zip(jobs, answers, strict=True):
        assert (
            r.choices[0].message.content == expected["hello" if messages is HELLO else "other"].text
        )


def test_models_and_health(client, base):
    assert [m.id for m in client.models.list()] == [NAME]
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


BAD = [
    (b"{not json", None),
    (json.dumps({"model": "gpt-4", "messages": HELLO}).encode(), "model"),
    (json.dumps({"model": NAME, "messages": HELLO, "max_tokens": -1}).encode(), "max_tokens"),
    (json.dumps({"model": NAME, "messages": HELLO, "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"model": NAME}).encode(), "messages"),
    (json.dumps({"model": NAME, "messages": []}).encode(), "messages"),
    (
        json.dumps({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}).encode(),
        "messages.[0].role",
    ),
    (json.dumps({"model": NAME, "messages": [{"role": "user"}]}).encode(), "messages.[0].content"),
    (json.dumps({"model": NAME, "messages": HELLO, "temperature": 5}).encode(), "temperature"),
    (json.dumps({"model": NAME, "messages": HELLO, "top_p": -0.5}).encode(), "top_p"),
    (json.dumps({"model": NAME, "messages": HELLO, "stop": [1, 2]}).encode(), "stop"),
    (json.dumps(["not", "an", "object"]).encode(), None),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_requests_get_400_and_the_server_keeps_serving(base, client, expected, body, param):
    status, data = _raw(base, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "invalid_request_error"
    assert data["error"]["param"] == param
    assert data["error"]["message"]
    r = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == expected["hello"].text


def test_unknown_paths_get_404(base):
    for method, path in (
        ("GET", "/v1/nothing"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models/gpt-4"),
    ):
        status, data = _raw(base, method, path, b"{}" if method == "POST" else None)
        assert status == 404 and data["error"]["message"]
    assert _raw(base, "GET", "/health")[0] == 200


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.status_code == 400 and "gpt-4" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=-5, stream=True)


def test_port_in_use_is_a_user_error(loaded):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MlxLoraError, match=f"port {port} is in use; pass --port"):
            make_server(loaded, "127.0.0.1", port, NAME)


def test_cli_serves_until_ctrl_c(tiny_model, adapter):
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lora.serve",
            "--model",
            str(tiny_model),
            "--adapter",
            str(adapter),
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        line = ""
        while "serving" not in line:
            line = p.stderr.readline()
            assert line, "server exited before serving"
        m = re.search(r"serving model '([^']+)' at (http://127\.0\.0\.1:\d+)/v1", line)
        assert m and m.group(1) == "adapter"  # the adapter folder's name
        client = openai.OpenAI(base_url=f"{m.group(2)}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="adapter", messages=HELLO, max_tokens=5)
        assert r.usage.completion_tokens <= 5
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0


def test_cli_bad_adapter_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.serve", "--adapter", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip().startswith("error: --adapter /nonexistent")
        and len(r.stderr.strip().splitlines()) == 1
    )


def test_client_that_disconnects_mid_stream_frees_the_worker(base, client, expected):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": NAME, "messages": HELLO, "max_tokens": 1_000_000, "stream": True})
    conn.request(
        "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
    )
    r = conn.getresponse()
    assert r.status == 200 and r.read1(256).startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()  # a million tokens would take many minutes: the next answer proves it stopped
    quick = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
    r = quick.chat.completions.create(model=NAME, messages=HELLO, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == expected["hello"].text
