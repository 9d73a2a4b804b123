"""The studio without a browser: paths stay inside --root, bad input gets one clear message and the
server keeps serving, runs are child processes (crash, conflict), chat streams and survives a
browser that goes away, and the console → event translation the Watch tab relies on."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_DATA

from mlx_lora.core.cli import run
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.studio.__main__ import StudioConfig, build, main
from mlx_lora.studio.events import LineReader, curves, run_state
from mlx_lora.studio.jobs import Jobs
from mlx_lora.studio.paths import OutsideRoot, Roots

# ---------------------------------------------------------------- paths


def test_paths_stay_inside_the_roots(tmp_path):
    root, other, outside = tmp_path / "root", tmp_path / "other", tmp_path / "outside"
    for d in (root / "sub", other, outside):
        d.mkdir(parents=True)
    (root / "escape").symlink_to(outside)
    roots = Roots.parse(f"{root}{os.pathsep}{other}")
    assert roots.resolve("sub/x.json") == root / "sub" / "x.json"
    assert roots.resolve(str(other / "y")) == other / "y"
    for bad in ("../outside", "sub/../../outside/x", str(outside / "x"), "/etc/passwd",
                "escape/secret", "escape"):  # fmt: skip
        with pytest.raises(OutsideRoot, match="outside the studio's folders"):
            roots.resolve(bad)
    with pytest.raises(MlxLoraError, match="does not exist"):
        roots.resolve("sub/missing.json", must_exist=True)
    assert roots.model("qwen/Qwen1.5-4B-Chat") == "qwen/Qwen1.5-4B-Chat"  # a hub id, not a path
    assert roots.model("ollama:qwen2:0.5b") == "ollama:qwen2:0.5b"
    assert roots.model("sub") == str(root / "sub")
    with pytest.raises(OutsideRoot):
        roots.model("../outside")
    with pytest.raises(MlxLoraError, match="not a folder"):
        Roots.parse(str(tmp_path / "nope"))


# ---------------------------------------------------------------- events

# A child's stdout + stderr in one pipe: events, a progress bar redrawn with \r, a table, an error.
STREAM = (
    '{"event": "start", "step": 0, "total_steps": 30}\n'
    '{"event": "log", "step": 5, "loss": 7.8, "epoch": 0.15}\n'
    "GGUF x.gguf:  40%|████      | 1.00/2.00k [00:00<00:00]\r"
    "GGUF x.gguf: 100%|██████████| 2.00k/2.00k [00:00<00:00]\n"
    "verify x.gguf (f32)\n  tokenization (10 texts)  ok  10/10 texts identical\n"
    "error: cannot write checkpoint runs/a/checkpoint-30 (No space left on device); free disk "
    "space and --resume\n"
)


def test_child_output_becomes_events():
    reader = LineReader()
    events = []
    for i in range(0, len(STREAM), 7):  # arbitrary chunks, as a pipe delivers them
        events += reader.feed(STREAM[i : i + 7])
    events += reader.feed("", final=True)
    assert [e["event"] for e in events] == ["start", "log", "text", "text", "text", "end"]
    assert events[1] == {"event": "log", "step": 5, "loss": 7.8, "epoch": 0.15}
    texts = [e["text"] for e in events if e["event"] == "text"]
    assert texts[0].endswith("100%|██████████| 2.00k/2.00k [00:00<00:00]")  # only the last redraw
    assert texts[2] == "  tokenization (10 texts)  ok  10/10 texts identical"
    assert events[-1]["status"] == "error" and events[-1]["message"].startswith("cannot write")


def test_event_reporter_is_the_contract(tiny_model, tmp_path, monkeypatch):
    """What a run started by the studio prints: the events its docstring lists, with the same
    records as trainer_state.json."""
    from mlx_lora.config import TrainConfig
    from mlx_lora.train.loop import train
    from mlx_lora.train.report import EVENTS_ENV, JsonLinesReporter, default_reporter

    monkeypatch.setenv(EVENTS_ENV, "jsonl")
    assert isinstance(default_reporter(lead=True, progress=True), JsonLinesReporter)
    out = io.StringIO()
    cfg = TrainConfig(
        model=str(tiny_model), data=str(SAMPLE_DATA), output_dir=str(tmp_path / "run"),
        max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        logging_steps=2, save_steps=3, val_split=0.1, max_seq_length=128,
        gradient_checkpointing=False,
    )  # fmt: skip
    train(cfg, reporter=JsonLinesReporter(stream=out, min_interval=0))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(set(e) >= {"event"} for e in events)
    assert events[0] == {"event": "start", "step": 0, "total_steps": 6, "steps_per_epoch": 61}
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert set(steps[-1]) == {"event", "step", "total_steps", "loss", "tokens_per_second",
                              "peak_memory_gb", "elapsed_s", "eta_s"}  # fmt: skip
    assert steps[-1]["eta_s"] == 0 and steps[-1]["tokens_per_second"] > 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text(encoding="utf-8"))
    records = [
        {k: v for k, v in e.items() if k != "event"}
        for e in events
        if e["event"] in ("log", "eval")
    ]
    assert records == [h for h in state["log_history"] if "train_runtime" not in h]
    texts = [e["text"] for e in events if e["event"] == "text"]
    assert texts[0].startswith("data: ")
    assert events[-2]["event"] == "summary" and events[-2]["train_runtime"] > 0
    assert events[-1]["event"] == "end" and events[-1]["status"] == "finished"
    assert events[-1]["message"].startswith("adapter saved to")


def test_run_state_reads_the_newest_state_and_curves(tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoint-20"
    ck.mkdir(parents=True)
    history = [{"loss": 2.0, "step": 10}, {"eval_loss": 2.5, "step": 20}, {"loss": 1.5, "step": 20}]
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"):
        (ck / name).write_text("x")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    state = run_state(out)
    assert state["global_step"] == 20
    assert curves(state["log_history"]) == {
        "loss": [[10, 2.0], [20, 1.5]],
        "eval_loss": [[20, 2.5]],
    }


def test_a_crashing_run_ends_with_a_message(tmp_path):
    lines = []
    jobs = Jobs(tmp_path, lines.append)
    job = jobs.start("train", "mlx_lora.no_such_module", [], tmp_path / "out")
    assert job.done.wait(60)
    assert job.status == "failed" and job.exit_code == 1
    assert "exited with code 1" in job.message and "No module named" in job.message
    assert "no checkpoint was written yet" in job.message
    assert any("failed (exit code 1)" in ln for ln in lines)


# ---------------------------------------------------------------- the server


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body: dict | None = None, headers: dict | None = None):
        """(status, JSON) of a request; POST when ``body`` is given."""
        data = None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(self.url + path, data=data, headers={**h, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw.startswith((b"{", b"[")) else raw)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def job(self, jid: str, *wanted: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while True:
            _, snap = self.call(f"/api/job?id={jid}")
            if snap["status"] in wanted or time.time() > deadline:
                return snap
            time.sleep(0.2)


@pytest.fixture(scope="module")
def studio(tiny_model, tmp_path_factory):
    """An in-process studio over two roots: a work folder and the tiny model's folder."""
    root = tmp_path_factory.mktemp("studio")
    (root / "data").mkdir()
    (root / "data" / "sample.json").write_bytes(SAMPLE_DATA.read_bytes())
    (root / "data" / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n  {oops}]')
    bad_model = root / "models" / "broken"
    bad_model.mkdir(parents=True)
    (bad_model / "config.json").write_text("{not json")
    cfg = StudioConfig(port=0, root=f"{root}{os.pathsep}{tiny_model.parent}")
    state, server = build(cfg)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield Client(f"http://127.0.0.1:{state.port}"), root, tiny_model, state
    state.jobs.shutdown(timeout=30)
    server.shutdown()
    server.server_close()
    state.chat.close()


def test_page_static_files_and_cross_site_guards(studio):
    c, *_ = studio
    status, page = c.call("/")
    assert status == 200 and b"mlx_lora" in page and b"/static/app.js" in page
    assert c.call("/static/vendor/uplot/uPlot.iife.min.js")[0] == 200
    assert c.call("/static/../../../etc/passwd")[0] == 404
    assert c.call("/api/info", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    status, err = c.call("/api/preview", {}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "refused" in err["error"]
    req = urllib.request.Request(c.url + "/api/train", data=b"model=x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:  # a form post from another site: no JSON
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403


def test_info_and_scan(studio):
    c, root, tiny, _ = studio
    status, info = c.call("/api/info")
    assert status == 200 and info["train_defaults"]["lora_alpha"] == 32.0
    assert info["train_defaults"]["per_device_train_batch_size"] == 4  # the seed's defaults
    assert "q8_0" in info["gguf_types"]
    _, found = c.call("/api/scan")
    assert "data/sample.json" in found["data"] and str(tiny) in found["models"]


def test_preview_shows_what_is_trained(studio):
    c, _, tiny, _ = studio
    status, res = c.call("/api/preview", {"model": str(tiny), "data": "data/sample.json"})
    assert status == 200 and res["format"] == "alpaca" and res["records"] > 3
    ex = res["examples"][0]
    trained = "".join(s["text"] for s in ex["segments"] if s["trained"])
    assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
    assert sum(s["tokens"] for s in ex["segments"] if s["trained"]) == ex["trained_tokens"]


def test_memory_plan_for_the_form(studio):
    c, _, tiny, _ = studio
    body = {"model": str(tiny), "data": "data/sample.json", "output_dir": "runs/planned"}
    status, res = c.call("/api/plan", body)
    assert status == 200 and res["ok"], res
    assert "peak" in res["text"] and "LoRA" in res["text"]
    body["per_device_train_batch_size"] = 0
    status, res = c.call("/api/plan", body)
    assert status == 400 or not res["ok"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"data": "data/broken.json"}, 400, r"broken.json:2:4: invalid JSON"),
        ({"data": "data/missing.json"}, 400, "does not exist"),
        ({"data": "../../etc/passwd"}, 403, "outside the studio's folders"),
        ({"model": "models/broken"}, 400, "config.json: not valid JSON"),
    ],
)
def test_preview_bad_input(studio, body, status, message):
    c, _, tiny, _ = studio
    got, err = c.call("/api/preview", {"model": str(tiny), "data": "data/sample.json", **body})
    assert got == status and message in err["error"]
    assert c.call("/api/info")[0] == 200  # still serving


def _train(tiny: Path, out: str, **kw) -> dict:
    return {
        "model": str(tiny), "data": "data/sample.json", "output_dir": out, "max_steps": 3,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1,
        "save_steps": 2, "max_seq_length": 128, "gradient_checkpointing": False, **kw,
    }  # fmt: skip


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"data": "data/broken.json"}, 400, "invalid JSON"),
        ({"output_dir": "/tmp/elsewhere"}, 403, "outside"),
        ({"model": "models/broken"}, 400, "not valid JSON"),
        ({"learning_rate": -1}, 400, "--learning-rate must be > 0"),
        ({"lora_r": "eight"}, 400, "invalid int value"),
        ({"no_such_flag": 1}, 400, "unknown setting"),
    ],
)
def test_train_refused_before_anything_starts(studio, change, status, message):
    c, root, tiny, state = studio
    n_jobs = len(state.jobs.jobs)
    got, err = c.call("/api/train", _train(tiny, "runs/refused", **change))
    assert got == status and message in err["error"]
    assert len(state.jobs.jobs) == n_jobs and not (root / "runs" / "refused").exists()


def test_run_conflict_crash_and_finish(studio):
    c, root, tiny, _ = studio
    status, job = c.call("/api/train", _train(tiny, "runs/long", max_steps=100000, save_steps=50))
    assert status == 200 and job["status"] == "running"
    # two runs into one output folder: refused while the first is running
    status, err = c.call("/api/train", _train(tiny, "runs/long", max_steps=5))
    assert status == 409 and "being written by train-" in err["error"]
    deadline = time.time() + 90
    while True:  # let it get going
        _, snap = c.call(f"/api/job?id={job['id']}")
        if snap["progress"].get("step") or snap["status"] != "running" or time.time() > deadline:
            break
        time.sleep(0.2)
    assert snap["progress"]["total_steps"] == 100000
    os.kill(job["pid"], signal.SIGKILL)  # the run crashes hard
    snap = c.job(job["id"], "failed")
    assert snap["status"] == "failed" and "was killed by SIGKILL" in snap["message"]
    assert c.call("/api/info")[0] == 200  # the page is still served
    # the folder is free again; a short run finishes and its curve is readable
    status, job = c.call("/api/train", _train(tiny, "runs/short", val_split=0.1, eval_steps=2))
    assert status == 200
    snap = c.job(job["id"], "finished", "failed")
    assert snap["status"] == "finished", snap
    assert [h["step"] for h in snap["history"] if "loss" in h] == [1, 2, 3]
    _, res = c.call("/api/runs", {"dirs": ["runs/short"]})
    run_ = res["runs"][0]
    assert [p[0] for p in run_["curves"]["loss"]] == [1, 2, 3] and run_["curves"]["eval_loss"]
    assert run_["finished"] and run_["figures"]["train_tokens_per_second"] > 0


def test_the_form_trains_a_preference_method(studio):
    """--method passes through the form: preference data is checked as such (not refused as
    an SFT format), the run logs TRL's metrics and records its method."""
    c, root, tiny, state = studio
    (root / "data" / "pairs.json").write_bytes((REPO / "dataset" / "preference_sample.json")
                                               .read_bytes())  # fmt: skip
    assert "dpo" in c.call("/api/info")[1]["methods"]
    body = _train(tiny, "runs/dpo", data="data/pairs.json", method="dpo", beta=0.2)
    status, job = c.call("/api/train", body)
    assert status == 200, job
    snap = c.job(job["id"], "finished", "failed")
    assert snap["status"] == "finished", snap
    assert any("rewards/accuracies" in h for h in snap["history"])
    rec = json.loads((root / "runs" / "dpo" / "adapter_config.json").read_text())["mlx_lora"]
    assert rec["method"] == "dpo"
    bad = _train(tiny, "runs/dpo-bad", data="data/sample.json", method="dpo")
    got, err = c.call("/api/train", bad)
    assert got == 400 and "--method dpo needs" in err["error"]


def test_closing_the_studio_stops_runs_with_a_checkpoint(tiny_model, tmp_path):
    jobs = Jobs(tmp_path, lambda line: None)
    flags = ["--model", str(tiny_model), "--data", str(SAMPLE_DATA), "--output-dir",
             str(tmp_path / "run"), "--max-steps", "100000", "--save-steps", "100000",
             "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
             "--max-seq-length", "128", "--no-gradient-checkpointing"]  # fmt: skip
    job = jobs.start("train", "mlx_lora.train", flags, tmp_path / "run")
    deadline = time.time() + 90
    while not job.progress.get("step") and job.running and time.time() < deadline:
        time.sleep(0.1)
    jobs.shutdown(timeout=60)  # what Ctrl-C / SIGTERM of the studio does
    assert job.status == "stopped" and job.exit_code == 130, job.lines[-3:]
    assert "interrupted: saved" in job.message
    assert list((tmp_path / "run").glob("checkpoint-*/optimizer.safetensors"))


def test_chat_streams_and_survives_a_disconnect(studio, capfd):
    c, _, tiny, _ = studio
    body = {"model": str(tiny), "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4000, "temperature": 1.0, "seed": 1}  # fmt: skip
    port = int(c.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        payload = json.dumps(body).encode()
        s.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(payload)) + payload
        )
        got = b""
        while b'{"delta"' not in got:
            chunk = s.recv(4096)
            assert chunk, got  # the answer must still be streaming
            got += chunk
        s.shutdown(socket.SHUT_RDWR)  # the browser goes away mid-answer
    t0 = time.time()
    short = {**body, "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(
        c.url + "/api/chat", json.dumps(short).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = [json.loads(x) for x in r.read().decode().splitlines()]
    assert lines[-1]["done"] and "".join(x.get("delta", "") for x in lines) == lines[-1]["text"]
    assert time.time() - t0 < 60
    deadline = time.time() + 10
    err = ""
    while "disconnected mid-answer" not in err and time.time() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.1)
    assert "disconnected mid-answer; generation stopped" in err


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"adapter": "../../x"}, 403, "outside"),
        ({"messages": []}, 400, "at least one user message"),
        ({"model": "models/broken"}, 400, "not valid JSON"),
        ({"temperature": -1}, 400, "temperature must be between 0 and 2"),
    ],
)
def test_chat_bad_input(studio, body, status, message):
    c, _, tiny, _ = studio
    full = {"model": str(tiny), "messages": [{"role": "user", "content": "Hi"}], **body}
    got, err = c.call("/api/chat", full)
    assert got == status and message in err["error"]


def test_exports_stay_inside(studio):
    c, *_ = studio
    status, err = c.call("/api/export", {"adapter": "runs/none", "output_dir": "export"})
    assert status == 400 and "does not exist" in err["error"]
    assert c.call("/api/export", {"adapter": "runs/short", "output_dir": "/export"})[0] == 403


# ---------------------------------------------------------------- the command


def test_port_in_use_and_bad_root(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(MlxLoraError, match=f"port {port} on 127.0.0.1 is in use"):
            build(StudioConfig(port=port, root=str(tmp_path)))
    assert run(main, ["--root", str(tmp_path / "missing")]) == 2


def test_public_host_warns_and_ctrl_c_stops(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora.studio", "--host", "0.0.0.0", "--port", "0",
         "--root", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert "mlx_lora studio: http://127.0.0.1:" in first
        port = int(first.split(":")[3].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "warning: --host 0.0.0.0 makes the studio reachable from other machines" in err
    finally:
        if proc.poll() is None:
            proc.kill()
