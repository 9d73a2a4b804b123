"""The Chat tab's compare mode without a browser: several runs of one base answer the same
conversation from one loaded adapter set, each exactly as it answers alone through the normal chat
path; runs of different bases, bad columns and paths outside --root get a one-line JSON error."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_studio import Client

from mlx_lora.model import load as load_module
from mlx_lora.studio.__main__ import StudioConfig, build
from mlx_lora.testing.adapter import random_adapter
from mlx_lora.testing.tiny_model import make_tiny_model

HI = [{"role": "user", "content": "Hi"}]
TWO_TURNS = [*HI, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def studio(tiny_model, tmp_path_factory):
    """A studio whose root holds two runs of the tiny model and one run of another base."""
    root = tmp_path_factory.mktemp("compare")
    random_adapter(tiny_model, root / "runs" / "a", seed=1, scale=0.5)
    b_targets = ("q_proj", "v_proj", "down_proj")  # other targets, rank and a system prompt
    random_adapter(tiny_model, root / "runs" / "b", seed=2, scale=2.0, r=8, targets=b_targets,
                   system_prompt="You are B.")  # fmt: skip
    other = make_tiny_model(root / "models" / "other", hidden_size=32, seed=3)
    random_adapter(other, root / "runs" / "other", seed=4)
    cfg = StudioConfig(port=0, root=f"{root}{os.pathsep}{tiny_model.parent}")
    state, server = build(cfg)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield Client(f"http://127.0.0.1:{state.port}"), root, tiny_model, state
    server.shutdown()
    server.server_close()
    state.chat.close()


def post_lines(c: Client, path: str, body: dict) -> list[dict]:
    """The JSON lines of a streamed answer (200 only)."""
    req = urllib.request.Request(
        c.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(x) for x in r.read().decode().splitlines()]


def columns(*runs: str | None, messages: list[dict] = HI) -> list[dict]:
    return [{"base": True, "messages": messages} if r is None else
            {"adapter": r, "messages": messages} for r in runs]  # fmt: skip


def test_each_column_answers_as_that_run_alone(studio, monkeypatch):
    c, _, _, state = studio
    loads = []
    real = load_module.load_base
    monkeypatch.setattr(load_module, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    compared = {}
    for messages in (HI, TWO_TURNS):
        body = {"columns": columns("runs/a", None, "runs/b", messages=messages), **GREEDY}
        lines = post_lines(c, "/api/chat/compare", body)
        assert lines[-1] == {"end": True, "columns": 3}
        done = {x["column"]: x for x in lines if x.get("done")}
        assert sorted(done) == [0, 1, 2]
        for i in range(3):  # the streamed pieces of a column make up its answer
            pieces = [x["delta"] for x in lines if x.get("column") == i and "delta" in x]
            assert "".join(pieces) == done[i]["text"] and done[i]["completion_tokens"] > 0
        compared[len(messages)] = [done[i]["text"] for i in range(3)]
        assert len(set(compared[len(messages)])) == 3  # the runs differ, from each other and base
    assert len(loads) == 1  # the base was read once, for both requests
    assert [k[0] for k in state.chat.cache] == ["adapter set"]
    # the normal chat path, one model at a time: the same greedy answers
    alone = [
        {"adapter": "runs/a"},
        {"adapter": "runs/a", "base": True},  # the base: the run's model without it
        {"adapter": "runs/b"},
    ]
    for messages in (HI, TWO_TURNS):
        for i, target in enumerate(alone):
            single = post_lines(c, "/api/chat", {**target, "messages": messages, **GREEDY})
            assert single[-1]["text"] == compared[len(messages)][i], (messages, target)


def test_runs_of_different_bases_are_refused(studio):
    c, *_ = studio
    status, err = c.call("/api/chat/compare", {"columns": columns("runs/a", "runs/other")})
    assert status == 400 and set(err) == {"error"} and "\n" not in err["error"]
    assert "runs/a and runs/other were trained on different bases" in err["error"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"columns": "runs/a"}, 400, "columns: expected a list"),
        ({"columns": [1, 2]}, 400, "columns: expected a list"),
        ({"columns": columns("runs/a")}, 400, "compare 2 to 6 runs"),
        ({"columns": columns("runs/a", None)}, 400, "pick two or more runs"),
        ({"columns": columns(*["runs/a"] * 8)}, 400, "compare 2 to 6 runs"),
        ({"columns": columns("runs/a", "runs/./a")}, 400, "runs/a is picked twice"),
        ({"columns": columns("runs/a", "runs/b", None, None)}, 400, "base model is picked twice"),
        ({"columns": columns("runs/a", "../../etc")}, 403, "outside the studio's folders"),
        ({"columns": columns("runs/a", "runs/none")}, 400, "does not exist"),
        ({"columns": [{"adapter": "runs/a", "messages": HI, "x": 1}, {}]}, 400, "unknown key"),
        ({"columns": [{"adapter": "runs/a", "base": True, "messages": HI}, {}]}, 400, "not both"),
        ({"columns": [{"adapter": "runs/a", "base": "yes", "messages": HI}, {}]}, 400, "true or"),
        ({"columns": [{"adapter": "runs/a", "messages": []}, {}]}, 400, "at least one user"),
        ({"columns": [{"adapter": 5, "messages": HI}, {}]}, 400, "expected a path"),
        ({"columns": columns("runs/a", "runs/b"), "temperature": -1}, 400, "between 0 and 2"),
        ({"columns": columns("runs/a", "runs/b"), "top_k": [1]}, 400, "expected a number"),
        ({"columns": columns("runs/a", "runs/b"), "model": "../x"}, 403, "outside"),
    ],
)
def test_compare_bad_input(studio, body, status, message):
    c, *_ = studio
    got, err = c.call("/api/chat/compare", body)
    assert got == status and message in err["error"] and "\n" not in err["error"], err
    assert c.call("/api/info")[0] == 200  # still serving


def test_compare_survives_a_disconnect(studio, capfd):
    c, *_ = studio
    body = {"columns": columns("runs/a", "runs/b"), "max_tokens": 4000, "temperature": 1.0}
    port = int(c.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        payload = json.dumps(body).encode()
        s.sendall(
            b"POST /api/chat/compare HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (port, len(payload))
            + payload
        )
        got = b""
        while b'"delta"' not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        s.shutdown(socket.SHUT_RDWR)  # the browser goes away mid-answer
    t0 = time.time()
    lines = post_lines(c, "/api/chat/compare", {**body, **GREEDY})
    assert lines[-1]["end"] and time.time() - t0 < 60
    deadline, err = time.time() + 10, ""
    while "compare: the browser disconnected" not in err and time.time() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.1)
    assert "compare: the browser disconnected mid-answer; generation stopped" in err


def test_an_adapter_set_that_cannot_load_is_one_line(studio, tmp_path):
    """A DoRA run cannot share a base with others: refused before anything streams."""
    c, root, tiny, _ = studio
    dora = root / "runs" / "dora"
    random_adapter(tiny, dora, seed=5)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    status, err = c.call("/api/chat/compare", {"columns": columns("runs/a", "runs/dora")})
    assert status == 400 and "DoRA" in err["error"] and "\n" not in err["error"]
    with pytest.raises(urllib.error.HTTPError):
        post_lines(c, "/api/chat/compare", {"columns": columns("runs/dora", "runs/b")})
