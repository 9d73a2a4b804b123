"""The studio under hostile input: every bad request gets a 4xx JSON answer of one line, starts
nothing, writes nothing outside ``--root``, and the studio answers the next request.

Classes: model names shaped like hub ids (never read from the working directory), names that
become folders, Host/Origin from elsewhere (also with ``--host 0.0.0.0``), broken bodies and
headers, huge preview data, bad ``--port`` / ``--host`` values. ``HOSTILE`` counts the cases.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_DATA

from mlx_lora.core.cli import run
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model import hub
from mlx_lora.studio import api, preview
from mlx_lora.studio.__main__ import StudioConfig, build, main
from mlx_lora.studio.paths import OutsideRoot, Roots, loadable
from mlx_lora.studio.server import MAX_BODY

# ---------------------------------------------------------------- a studio, raw HTTP


class Studio:
    """A studio served in a thread, and requests sent byte by byte."""

    def __init__(self, cfg: StudioConfig):
        self.state, self.server = build(cfg)
        self.server.RequestHandlerClass.timeout = 1.0  # a body that never comes: 1 s, not 20
        self.port = self.state.port
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    def close(self) -> None:
        self.state.jobs.shutdown(timeout=30)
        self.server.shutdown()
        self.server.server_close()
        self.state.chat.close()

    def raw(self, data: bytes, *, half_close: bool = False, timeout: float = 10) -> tuple:
        """(status, JSON answer, seconds) for the bytes of one request."""
        t0 = time.time()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1."), got[:200]  # an answer, never a dropped connection
        status = int(head.split()[1])
        assert b"application/json" in head or b"ndjson" in head, head
        return status, json.loads(body), time.time() - t0

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        **kw,
    ) -> tuple:
        h = {"Host": self.host}
        if body is not None:
            h |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
        h |= headers or {}
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
        return self.raw(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""), **kw)

    def post(self, path: str, obj: object, headers: dict | None = None) -> tuple[int, dict]:
        status, answer, _ = self.request("POST", path, json.dumps(obj).encode(), headers)
        return status, answer

    def alive(self) -> None:
        status, info, _ = self.request("GET", "/api/info")
        assert status == 200 and "version" in info


def refused(answer: dict) -> str:
    """The one-line message of a refusal (no traceback on the page)."""
    msg = answer["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg
    return msg


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("hostile-root")
    (root / "data").mkdir()
    shutil.copy(SAMPLE_DATA, root / "data" / "sample.json")
    (root / "runs" / "fake").mkdir(parents=True)  # an adapter folder for the export form
    (root / "loop").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop")
    return root


@pytest.fixture(scope="module")
def studio(root, tiny_model):
    s = Studio(StudioConfig(port=0, root=f"{root}{os.pathsep}{tiny_model.parent}"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def public(root, tiny_model):
    """The studio as ``--host 0.0.0.0`` runs it."""
    s = Studio(StudioConfig(host="0.0.0.0", port=0, root=f"{root}{os.pathsep}{tiny_model.parent}"))
    yield s
    s.close()


def train_body(tiny: Path, **change) -> dict:
    body = {"model": str(tiny), "data": "data/sample.json", "output_dir": "runs/hostile",
            "max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "max_seq_length": 128}  # fmt: skip
    return {**body, **change}


def nothing_started(studio: Studio, root: Path, before: set[str], jobs: int) -> None:
    assert len(studio.state.jobs.jobs) == jobs
    assert tree(root) == before
    studio.alive()


# ---------------------------------------------------------------- 1. model names


@pytest.fixture
def cwd_with_hub_shaped_folder(tmp_path, monkeypatch, tiny_model):
    """The working directory (outside --root) holds ``dir/name``, a broken model folder; the hub
    "serves" ``dir/name`` as the tiny model (its fetchers are replaced: no network)."""
    cwd = tmp_path / "cwd"
    (cwd / "dir" / "name").mkdir(parents=True)
    (cwd / "dir" / "name" / "config.json").write_text("{broken")
    (cwd / "dir" / "x.gguf").write_text("not a gguf")
    monkeypatch.chdir(cwd)
    fetched: list[str] = []

    def fake_hub(model_id, local_only, patterns):
        fetched.append(model_id)
        return tiny_model

    monkeypatch.setitem(hub._FETCHERS, "modelscope", fake_hub)
    monkeypatch.setitem(hub._FETCHERS, "huggingface", fake_hub)
    return fetched


def test_hub_id_is_never_a_folder_of_the_working_directory(
    studio, root, tiny_model, cwd_with_hub_shaped_folder
):
    fetched = cwd_with_hub_shaped_folder
    roots = studio.state.roots
    assert Path("dir/name/config.json").is_file()  # it is there, in the cwd, outside --root
    assert roots.model("dir/name") == "dir/name"  # a hub id for the commands (cwd = the root)
    assert studio.state.jobs.cwd == root
    assert loadable("dir/name") == str(tiny_model) and fetched == ["dir/name"]
    # preview loads in the studio's own process: through the hub, not the cwd's broken folder
    status, res = studio.post("/api/preview", {"model": "dir/name", "data": "data/sample.json"})
    assert status == 200 and res["examples"], res
    flags, _ = api.train_flags(studio.state, train_body(tiny_model, model="dir/name"))
    assert "--model=dir/name" in flags  # the cwd's config.json was not read (it is broken)
    model, _ = api.chat_target(studio.state, {"model": "dir/name"})
    assert model == str(tiny_model)
    # a folder of that name under the root wins over the hub
    (root / "org" / "m").mkdir(parents=True)
    assert roots.model("org/m") == str(root / "org" / "m")


MODEL_NAMES = [
    ("dir/x.gguf", 400, "does not exist"),  # a .gguf is a file under the root, never the cwd's
    ("../dir/name", 403, "outside"),
    ("dir/../../name", 403, "outside"),
    ("dir/../name", 400, "does not exist"),
    ("dir/name/", 400, "does not exist"),
    ("dir//name", 400, "does not exist"),
    ("./dir/name", 400, "does not exist"),
    ("~/dir/name", 400, "does not exist"),
    ("/etc/passwd", 403, "outside"),
    ("dir/na\nme", 400, "control characters"),
    ("dir/na\x00me", 400, "control characters"),
    ("ollama:../../../etc/passwd", 400, "not an Ollama name"),
    ("ollama:/etc/passwd", 400, "not an Ollama name"),
    ("ollama:a/../../b", 400, "not an Ollama name"),
    ("ollama:", 400, "not an Ollama name"),
    ("", 400, "empty|pick an adapter"),
    (None, 400, "empty|pick an adapter"),
    (["dir/name"], 400, "expected a folder"),
    (5, 400, "expected a folder"),
    (True, 400, "expected a folder"),
    ({"id": "dir/name"}, 400, "expected a folder"),
    ("a" * 300 + "/b", 400, "too long"),
    ("a/" + "b" * 300, 400, "too long"),
    ("loop/x/y", 400, "cannot be followed"),  # a symlink loop under the root
]


@pytest.mark.parametrize("name, status, message", MODEL_NAMES, ids=repr)
def test_bad_model_names(studio, root, cwd_with_hub_shaped_folder, name, status, message):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    for path, extra in (("/api/preview", {"data": "data/sample.json"}), ("/api/chat", {})):
        messages = [{"role": "user", "content": "hi"}]
        got, err = studio.post(path, {"model": name, "messages": messages, **extra})
        assert got == status and re.search(message, refused(err)), (path, err)
    assert cwd_with_hub_shaped_folder == []  # nothing was fetched either
    nothing_started(studio, root, before, jobs)


# ---------------------------------------------------------------- 2. names that become folders

BAD_NAMES = [
    "..", ".", "../escape", "../../escape", "/tmp/hostile-abs", "a/b", "a\\b", "a\x00b", "a\nb",
    "x" * 101, "中" * 70, ".hidden", " lead", "trail ", "-flag", "--overwrite-output-dir",
    "a..b", "a\tb", "~root", "$HOME", ["run"], 5, True, {"a": 1},
]  # fmt: skip


@pytest.mark.parametrize("field", ["run_name", "project_name"])
@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
def test_tracker_names_stay_names(studio, root, tiny_model, field, value):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    status, err = studio.post("/api/train", train_body(tiny_model, **{field: value}))
    assert status == 400 and refused(err).startswith(f"{field}: ")
    status, err = studio.post("/api/plan", train_body(tiny_model, **{field: value}))
    assert status == 400
    assert not Path("/tmp/hostile-abs").exists() and not (root.parent / "escape").exists()
    nothing_started(studio, root, before, jobs)


@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
def test_export_name_stays_a_name(studio, root, value):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    body = {"adapter": "runs/fake", "output_dir": "exports/x", "name": value}
    status, err = studio.post("/api/export", body)
    assert status == 400 and refused(err).startswith("name: ")
    nothing_started(studio, root, before, jobs)


def test_plain_names_pass(studio, tiny_model):
    for name in ("my run (lr=1e-4)", "实验一", "a.b-c_d+e@f[1]", "x" * 100):
        flags, _ = api.train_flags(studio.state, train_body(tiny_model, run_name=name))
        assert f"--run-name={name}" in flags


# ---------------------------------------------------------------- 3. Host and Origin

BAD_HOSTS = [
    "evil.example:{port}", "evil.example", "127.0.0.1:1", "127.0.0.1", "", "0.0.0.0:{port}",
    "localhost:{port}.evil.example", "127.0.0.1:{port}@evil.example", "127.0.0.2:{port}",
    "[::2]:{port}", "localhost.:{port}",
]  # fmt: skip


@pytest.mark.parametrize("which", ["studio", "public"])
@pytest.mark.parametrize("host", BAD_HOSTS)
def test_foreign_host_is_refused(request, root, tiny_model, which, host):
    s = request.getfixturevalue(which)
    before, jobs = tree(root), len(s.state.jobs.jobs)
    h = host.format(port=s.port)
    status, err, _ = s.request("GET", "/api/info", headers={"Host": h})
    assert status == 403 and "unknown Host" in refused(err)
    body = json.dumps(train_body(tiny_model)).encode()
    for origin in (None, f"http://{h}"):  # DNS rebinding: a foreign name, its own origin
        status, err, _ = s.request("POST", "/api/train", body, {"Host": h, "Origin": origin})
        assert status == 403
    nothing_started(s, root, before, jobs)


def test_two_host_headers_are_refused(public):
    data = f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{public.port}\r\nHost: evil.example\r\n\r\n"
    assert public.raw(data.encode())[0] == 403
    public.alive()


@pytest.mark.parametrize("which", ["studio", "public"])
def test_own_names_are_served(request, which):
    s = request.getfixturevalue(which)
    names = ["127.0.0.1", "localhost", "LOCALHOST", "[::1]"]
    names += [socket.gethostname()] if which == "public" else []
    for name in names:
        status, _, _ = s.request("GET", "/api/info", headers={"Host": f"{name}:{s.port}"})
        assert status == 200, name


BAD_ORIGINS = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},
    {"Origin": "https://127.0.0.1:{port}"},
    {"Origin": "http://localhost:{port}"},  # another origin than the Host the page names
    {"Origin": "http://127.0.0.1:{port}.evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/json-patch+json"},
    {"Content-Type": None},
]


@pytest.mark.parametrize("which", ["studio", "public"])
@pytest.mark.parametrize("headers", BAD_ORIGINS, ids=lambda h: "-".join(map(str, h.values())))
def test_foreign_posts_start_nothing(request, root, tiny_model, which, headers):
    s = request.getfixturevalue(which)
    before, jobs = tree(root), len(s.state.jobs.jobs)
    h = {k: v.format(port=s.port) if v else v for k, v in headers.items()}
    for path in ("/api/train", "/api/export", "/api/chat", "/api/stop"):
        status, err, _ = s.request("POST", path, json.dumps(train_body(tiny_model)).encode(), h)
        assert status == 403, (path, err)
        refused(err)
    nothing_started(s, root, before, jobs)


def test_own_origin_passes_the_guard(public):
    origin = {"Origin": f"http://127.0.0.1:{public.port}", "Sec-Fetch-Site": "same-origin"}
    status, err = public.post("/api/train", {"output_dir": 5}, origin)
    assert status == 400 and "expected a path" in refused(err)  # past the guard, refused later


# ---------------------------------------------------------------- 4. bodies and headers

BAD_JSON = [
    b"{", b"{'a': 1}", b"[1, 2", b"\xff\xfe{}", b"nul", b'{"a": 1} x', b"NaN", b'{"a": NaN}',
    b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}', b'{"a": ' + b"9" * 5000 + b"}",
    b"[" * 100_000, b'{"a": "\\ud800"', b"\x00", b" ",
]  # fmt: skip
NOT_OBJECTS = [b"[]", b"1", b'"x"', b"null", b"true", b"[{}]"]


@pytest.mark.parametrize("body", BAD_JSON + NOT_OBJECTS, ids=lambda b: repr(b[:20]))
def test_malformed_bodies(studio, root, body):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    for path in ("/api/train", "/api/preview", "/api/chat"):
        status, err, _ = studio.request("POST", path, body)
        assert status == 400 and refused(err).startswith("the request "), err
    nothing_started(studio, root, before, jobs)


WRONG_TYPES = [
    ("/api/train", {"lora_r": "eight"}, "invalid int value"),
    ("/api/train", {"learning_rate": "fast"}, "invalid float value"),
    ("/api/train", {"optim": 5}, "expected text"),
    ("/api/train", {"data": ["data/sample.json"]}, "expected a path"),
    ("/api/train", {"system_prompt": ["be nice"]}, "expected text"),
    ("/api/train", {"target_modules": {"q": 1}}, "expected text"),
    ("/api/train", {"lora_r": {}}, "expected a number"),
    ("/api/train", {"lora_r": [8]}, "expected a number"),
    ("/api/train", {"model": None}, "empty"),
    ("/api/train", {"data": None}, "empty"),
    ("/api/train", {"max_steps": 10**30}, "too large"),
    ("/api/train", {"max_steps": 1e300}, "too large"),
    ("/api/train", {"max_steps": 2.5}, "whole number"),
    ("/api/train", {"learning_rate": "1e999"}, "out of range"),
    ("/api/train", {"learning_rate": "nan"}, "out of range"),
    ("/api/train", {"lora_r": "9" * 30}, "out of range"),
    ("/api/train", {"lora_r": True}, "got true/false"),
    ("/api/train", {"packing": "yes"}, "expected true or false"),
    ("/api/train", {"packing": 1}, "expected true or false"),
    ("/api/train", {"gradient_checkpointing": 5}, "auto, on or off"),
    ("/api/train", {"gradient_checkpointing": "sometimes"}, "expected auto, on or off"),
    ("/api/train", {"resume": "yes"}, "resume: expected true or false"),
    ("/api/train", {"system_prompt": "a\x00b"}, "NUL"),
    ("/api/train", {"output_dir": 5}, "expected a path"),
    ("/api/train", {"output_dir": "runs/" + "x" * 300}, "too long"),
    ("/api/export", {"adapter": "runs/fake", "output_dir": "e", "num_ctx": "lots"}, "invalid int"),
    ("/api/export", {"adapter": "runs/fake", "output_dir": "e", "verify": "no"}, "true or false"),
    ("/api/export", {"adapter": ["runs/fake"], "output_dir": "e"}, "expected a path"),
    ("/api/export", {"adapter": "runs/fake", "output_dir": "e", "num_ctx": 2**60}, "too large"),
    ("/api/preview", {"max_seq_length": "abc"}, "not a whole number"),
    ("/api/preview", {"max_seq_length": True}, "expected a number"),
    ("/api/preview", {"max_seq_length": [1]}, "expected a number"),
    ("/api/preview", {"max_seq_length": 1e300}, "must be between"),
    ("/api/preview", {"max_seq_length": -5}, "must be between"),
    ("/api/preview", {"max_seq_length": 1.5}, "not a whole number"),
    ("/api/preview", {"format": ["alpaca"]}, "expected text"),
    ("/api/preview", {"format": "../x"}, "unknown format"),
    ("/api/preview", {"system_prompt": 5}, "expected text"),
    ("/api/chat", {"temperature": True}, "got true/false"),
    ("/api/chat", {"max_tokens": "1e999"}, "not a number"),
    ("/api/chat", {"temperature": "inf"}, "out of range"),
    ("/api/chat", {"top_k": [1]}, "expected a number"),
    ("/api/chat", {"seed": 10**20}, "too large"),
    ("/api/chat", {"messages": "hi"}, "at least one user message"),
    ("/api/chat", {"messages": [{"role": "user", "content": 5}]}, "each needs a role"),
    ("/api/chat", {"messages": [{"role": ["user"], "content": "x"}]}, "each needs a role"),
    ("/api/chat", {"system_prompt": ["x"]}, "expected text"),
    ("/api/runs", {"dirs": "runs"}, "expected a list"),
    ("/api/runs", {"dirs": [5]}, "expected a path"),
    ("/api/runs", {"dirs": {"a": 1}}, "expected a list"),
    ("/api/stop", {"id": ["x"]}, "expected text"),
    ("/api/stop", {"id": 5}, "expected text"),
    ("/api/resume", {"id": None}, "no job"),
]


@pytest.mark.parametrize("path, change, message", WRONG_TYPES, ids=repr)
def test_wrong_field_types(studio, root, tiny_model, path, change, message):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    base = train_body(tiny_model) if path in ("/api/train", "/api/preview") else {}
    if path == "/api/chat":
        base = {"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}]}
    status, err = studio.post(path, {**base, **change})
    assert status == 400 and message in refused(err), err
    nothing_started(studio, root, before, jobs)


@pytest.mark.parametrize("query", ["since=abc", "since=-1", "since=1e3", "since=" + "9" * 5000,
                                   "id=nope", "id=", "since=%00"])  # fmt: skip
def test_bad_queries(studio, query):
    status, err, _ = studio.request("GET", f"/api/job?{query}")
    assert status == 400
    refused(err)
    studio.alive()


LENGTHS = [
    ({"Content-Length": None}, 411),
    ({"Content-Length": None, "Transfer-Encoding": "chunked"}, 411),
    ({"Content-Length": "-1"}, 400),
    ({"Content-Length": "abc"}, 400),
    ({"Content-Length": "1e3"}, 400),
    ({"Content-Length": "+2"}, 400),
    ({"Content-Length": "0x10"}, 400),
    ({"Content-Length": "2, 2"}, 400),
    ({"Content-Length": ""}, 400),
    ({"Content-Length": "２"}, 400),
    ({"Content-Length": str(MAX_BODY + 1)}, 413),
    ({"Content-Length": "9" * 40}, 413),
]


@pytest.mark.parametrize("headers, status", LENGTHS, ids=lambda x: repr(x)[:40])
def test_bad_content_length(studio, root, headers, status):
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    got, err, seconds = studio.request("POST", "/api/train", b"{}", headers)
    assert got == status and seconds < 5
    refused(err)
    nothing_started(studio, root, before, jobs)


@pytest.mark.parametrize("half_close", [False, True])
def test_body_shorter_than_its_length_does_not_hang(studio, half_close):
    status, err, seconds = studio.request(
        "POST", "/api/train", b'{"a": 1}', {"Content-Length": "100"}, half_close=half_close
    )
    assert status == 400 and "ended early" in refused(err) and seconds < 5
    studio.alive()


def test_a_body_over_the_limit_is_answered_not_reset(studio):
    big = b'{"system_prompt": "' + b"x" * (2 * MAX_BODY) + b'"}'
    status, err, _ = studio.request("POST", "/api/train", big)
    assert status == 413 and "too large" in refused(err)
    studio.alive()


RAW_REQUESTS = [
    (b"PUT /api/train HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    (b"DELETE /api/jobs HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    (b"OPTIONS /api/train HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    (b"BREW /pot HTTP/1.1\r\nHost: {host}\r\n\r\n", 405),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    (b"GET / HTTP/2.0\r\nHost: {host}\r\n\r\n", 400),
    (b"GET / HTTP/1.1.1\r\n\r\n", 400),
    (b"\x00\x01\x02 garbage\r\n\r\n", 400),
    (b"GET /api/nothing HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"GET /static/../../etc/passwd HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"GET /api/%00 HTTP/1.1\r\nHost: {host}\r\n\r\n", 404),
    (b"POST /api/nothing HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n", 404),
]


@pytest.mark.parametrize("data, status", RAW_REQUESTS, ids=lambda x: repr(x)[:30])
def test_broken_requests(studio, data, status):
    got, err, _ = studio.raw(data.replace(b"{host}", studio.host.encode()))
    assert got == status
    refused(err)
    studio.alive()


# ---------------------------------------------------------------- 5. preview of huge data


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_20_mb_record_is_previewed_cut(studio, root, tiny_model, suffix):
    record = {"instruction": "q " * 5_000_000, "input": "", "output": "a " * 5_000_000}
    text = json.dumps([record] if suffix == ".json" else record)
    path = root / "data" / f"big{suffix}"
    path.write_text(text)
    del text, record
    peak = peak_rss_mb()
    t0 = time.time()
    status, res = studio.post(
        "/api/preview", {"model": str(tiny_model), "data": f"data/{path.name}"}
    )
    assert status == 200, res
    assert time.time() - t0 < 10
    assert peak_rss_mb() - peak < 500  # not the GBs of tokenizing 20 MB
    ex = res["examples"][0]
    assert ex["clipped"] and ex["truncated"] and ex["tokens"] == 2048
    assert "cut before tokenizing" in res["note"] and not res["partial"]
    path.unlink()
    studio.alive()


def test_a_long_conversation_is_previewed_cut(studio, root, tiny_model):
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": "hi"} for i in range(100_000)]
    path = root / "data" / "long.json"
    path.write_text(json.dumps([{"conversations": turns}]))
    status, res = studio.post("/api/preview", {"model": str(tiny_model), "data": "data/long.json"})
    assert status == 200 and res["examples"][0]["clipped"], res
    path.unlink()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_huge_file_is_read_only_in_part(studio, root, tiny_model, monkeypatch, suffix):
    monkeypatch.setattr(preview, "FULL_READ", 2**20)
    monkeypatch.setattr(preview, "PREFIX_BYTES", 2**18)
    records = [{"instruction": f"question {i} " * 20, "output": "answer"} for i in range(20_000)]
    path = root / "data" / f"huge{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("\n".join(map(json.dumps, records)))
    status, res = studio.post(
        "/api/preview", {"model": str(tiny_model), "data": f"data/{path.name}"}
    )
    assert status == 200 and res["partial"] and 0 < res["records"] <= preview.TRIED, res
    assert "only its first" in res["note"] and len(res["examples"]) == 3
    # one record bigger than what is read: a one-line refusal, not a parse of the whole file
    path.write_text(json.dumps([{"instruction": "x" * 2**21, "output": "y"}]))
    status, err = studio.post(
        "/api/preview", {"model": str(tiny_model), "data": f"data/{path.name}"}
    )
    assert status == 400 and "no complete record in its first" in refused(err)
    path.unlink()
    studio.alive()


@pytest.mark.parametrize(
    "content",
    [
        "[" * 50_000 + "]" * 50_000,
        '[{"instruction": ' + "[" * 900 + "]" * 900 + ', "output": "x"}]',
        '[{"instruction": "a", "output": "b"}, 7, null, "text"]',
        "[" + ", ".join(["{}"] * 500) + "]",
        "[" + ", ".join(['{"instruction": "", "output": ""}'] * 500) + "]",
        "\x00\x01",
        "",
    ],
    ids=["nested", "nested-field", "mixed", "unknown-format", "all-skipped", "binary", "empty"],
)
def test_strange_data_files(studio, root, tiny_model, content):
    path = root / "data" / "strange.json"
    path.write_text(content)
    status, res = studio.post(
        "/api/preview", {"model": str(tiny_model), "data": "data/strange.json"}
    )
    assert status in (200, 400), res
    if status == 400:
        refused(res)
    path.unlink()
    studio.alive()


# ---------------------------------------------------------------- 6. --port and --host

BAD_PORTS = ["abc", "-1", "65536", "70000", "1.5", "", "0x50", "99999999999999999999", " ", "-0x1"]


@pytest.mark.parametrize("port", BAD_PORTS)
def test_bad_port_is_one_line(tmp_path, capsys, port):
    assert run(main, ["--port", port, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("host", ["256.256.256.256", "1.2.3.4", "::zz", "a b"])
def test_bad_host_is_one_line(tmp_path, capsys, host):
    assert run(main, ["--host", host, "--port", "0", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot listen on" in err and err.count("\n") == 1


def test_bad_port_from_the_command_line(tmp_path):
    """Through ``python -m mlx_lora.studio``: the port in use and a negative one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        used = str(s.getsockname()[1])
        for port in (used, "-5"):
            done = subprocess.run(
                [sys.executable, "-m", "mlx_lora.studio", "--port", port, "--root", str(tmp_path)],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            assert done.returncode == 2, done.stderr
            assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
            assert "Traceback" not in done.stderr


def test_port_zero_is_any_free_port(tmp_path):
    state, server = build(StudioConfig(port=0, root=str(tmp_path)))
    try:
        assert 0 < state.port <= 65535 and f"127.0.0.1:{state.port}" in state.hosts
    finally:
        server.server_close()
        state.chat.close()


def test_paths_api_refuses_bad_types_directly(tmp_path):
    roots = Roots.parse(str(tmp_path))
    for bad in (5, None, ["a"], "", " ", "a\x00b", "a\rb"):
        with pytest.raises(MlxLoraError):
            roots.resolve(bad)
    with pytest.raises(OutsideRoot):
        roots.resolve("../x")


# ---------------------------------------------------------------- the count

# Each hostile input, times the servers / endpoints / fields it is sent to.
HOSTILE = (
    len(MODEL_NAMES) * 2  # preview and chat
    + 1  # hub-shaped folder in the cwd
    + len(BAD_NAMES) * 2 * 2  # run_name / project_name, train and plan
    + len(BAD_NAMES)  # export name
    + len(BAD_HOSTS) * 2 * 3  # two servers; GET, POST, POST with the rebound origin
    + 1  # two Host headers
    + len(BAD_ORIGINS) * 2 * 4  # two servers, four POST routes
    + len(BAD_JSON + NOT_OBJECTS) * 3  # three routes
    + len(WRONG_TYPES)
    + 7  # queries
    + len(LENGTHS)
    + 2  # short bodies
    + 1  # a body over the limit, sent
    + len(RAW_REQUESTS)
    + 2
    + 1
    + 2
    + 1
    + 7  # big records, long conversation, huge files, too-big record, strange
    + len(BAD_PORTS)
    + 4  # hosts
    + 2  # ports from the command line
    + 8  # Roots.resolve directly
)
# The inputs themselves, each counted once.
DISTINCT = (
    len(MODEL_NAMES) + 1 + len(BAD_NAMES) + len(BAD_HOSTS) + 1 + len(BAD_ORIGINS)
    + len(BAD_JSON + NOT_OBJECTS) + len(WRONG_TYPES) + 7 + len(LENGTHS) + 2 + 1
    + len(RAW_REQUESTS) + 13 + len(BAD_PORTS) + 4 + 2 + 8
)  # fmt: skip


def test_count_of_hostile_cases():
    print(f"\nhostile cases tried: {HOSTILE} ({DISTINCT} distinct inputs)")
    assert HOSTILE > 500 and DISTINCT > 200


@pytest.mark.parametrize("out", ["model", "inside model", "data folder", "root"])
def test_output_folder_over_an_input_is_refused(studio, root, tiny_model, out):
    """Nothing lost: a run whose output folder is, holds or lies inside its model or data."""
    where = {
        "model": str(tiny_model),
        "inside model": str(tiny_model / "run"),
        "data folder": "data",
        "root": ".",
    }[out]
    before, jobs = tree(root), len(studio.state.jobs.jobs)
    status, err = studio.post("/api/train", train_body(tiny_model, output_dir=where))
    assert status == 400 and "choose a separate folder" in refused(err), err
    assert not (tiny_model / "run").exists()
    nothing_started(studio, root, before, jobs)
