"""Bad input across train, chat, fuse, export and serve: one line, exit 2, nothing half-written.

Every case runs the real command in a subprocess (``python -m mlx_lora.<cmd>``) and checks the
contract of issue 6: exit code 2, stderr is exactly one ``error: …`` line that names the problem,
where it is and what to do, no traceback, and the folder the command was told to write into is
unchanged (no adapter, checkpoint, GGUF or temp file). Failures that cannot be provoked from the
command line (a full disk, a loss that turns NaN) run ``train()`` in-process with a patched writer
or loss; malformed HTTP requests go to an in-process server.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import REPO, SAMPLE_DATA, make_tiny_model

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.train.loop import train

# ------------------------------------------------------------------------------- fixtures


@dataclass
class Paths:
    model: Path  # the tiny Qwen2 model
    other: Path  # a second tiny model with hidden size 96 (adapters of `model` do not fit it)
    run: Path  # a finished training run on `model` (adapter + checkpoint-2)
    no_weights: Path  # config + tokenizer, no *.safetensors
    missing_shard: Path  # an index that lists a shard that is absent
    bigcode: Path  # model_type gpt_bigcode (mlx-lm knows it, the config does not fit it)
    unknown_arch: Path  # model_type nobody knows
    adapter_no_weights: Path  # adapter_config.json only
    data: dict[str, Path]


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _model_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def p(tiny_model, tmp_path_factory) -> Paths:
    root = tmp_path_factory.mktemp("bad_input")
    other = make_tiny_model(root / "tiny96", hidden_size=96, heads=4, kv_heads=2)

    run = root / "run"
    train(
        TrainConfig(
            model=str(tiny_model),
            data=str(SAMPLE_DATA),
            output_dir=str(run),
            max_steps=2,
            save_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            learning_rate=1e-3,
            max_seq_length=128,
            plot=False,
        ),
        progress=False,
    )

    no_weights = root / "no-weights"
    no_weights.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, no_weights / f.name)

    shard = _model_copy(tiny_model, root / "missing-shard")
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    names = list(mx.load(str(shard / "model-00001-of-00002.safetensors")))
    index = {
        "metadata": {},
        "weight_map": {
            n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)
        },
    }
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))

    bigcode = _model_copy(
        tiny_model,
        root / "bigcode",
        model_type="gpt_bigcode",
        architectures=["GPTBigCodeForCausalLM"],
    )
    unknown = _model_copy(tiny_model, root / "unknown-arch", model_type="frobnicator")

    adapter_no_weights = root / "adapter-no-weights"
    adapter_no_weights.mkdir()
    shutil.copy(run / "adapter_config.json", adapter_no_weights)

    d = root / "data"
    d.mkdir()
    rec = {"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"}
    line = json.dumps(rec, ensure_ascii=False)
    data = {
        "malformed.json": _write(
            d / "malformed.json", f'[\n  {line},\n  {{"instruction": "a" "output": "b"}}\n]\n'
        ),
        "bad_line.jsonl": _write(
            d / "bad_line.jsonl", f"{line}\n{line}\n{line}\n{{\"instruction\": 'x'}}\n{line}\n"
        ),
        "gbk.json": _write(d / "gbk.json", json.dumps([rec], ensure_ascii=False).encode("gbk")),
        "empty.json": _write(d / "empty.json", ""),
        "blank.jsonl": _write(d / "blank.jsonl", "\n  \n\n"),
        "no_fields.json": _write(
            d / "no_fields.json",
            json.dumps(
                [
                    {"instruction": "", "output": "x"},
                    {"instruction": "q", "input": "i"},
                    {"instruction": "q", "output": None},
                ]
            ),
        ),
        "unknown.json": _write(d / "unknown.json", json.dumps([{"question": "q", "answer": "a"}])),
        "scalar.json": _write(d / "scalar.json", "42"),
        "long_prompt.json": _write(
            d / "long_prompt.json",
            json.dumps(
                [{"instruction": "很长的问题" * 200, "output": "好。"}] * 4, ensure_ascii=False
            ),
        ),
    }
    return Paths(
        tiny_model, other, run, no_weights, shard, bigcode, unknown, adapter_no_weights, data
    )


# ------------------------------------------------------------------------------- helpers


def cli(cmd: str, *args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it (the CLI re-launches itself with OpenBLAS on Linux).

    mlx-lm sets TRANSFORMERS_NO_ADVISORY_WARNINGS in this test process when imported; a user's shell
    does not have it, so it is removed to see what the user sees.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", f"mlx_lora.{cmd}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def assert_user_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line ``error: …`` containing every needle, no traceback."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with size and mtime; directories that hold no file do not count."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = (Path(dirpath) / f).stat()
            out[str((Path(dirpath) / f).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    cmd: str
    args: Callable[[Paths, Path], list]  # (paths, output folder) → arguments
    needles: tuple[str, ...]
    setup: Callable[[Paths, Path], None] | None = None  # prepares the output folder


def _train(
    p: Paths, out: Path, *extra: object, data: str | None = None, model: Path | None = None
) -> list:
    return [
        "--model",
        model or p.model,
        "--data",
        p.data[data] if data else SAMPLE_DATA,
        "--output-dir",
        out,
        "--max-steps",
        2,
        "--per-device-train-batch-size",
        2,
        "--gradient-accumulation-steps",
        1,
        "--no-plot",
        *extra,
    ]


def _finished_run(p: Paths, out: Path) -> None:
    shutil.copytree(p.run, out)


def _unfinished_run(p: Paths, out: Path) -> None:
    out.mkdir()
    shutil.copytree(p.run / "checkpoint-2", out / "checkpoint-2")


def _file_in_the_way(p: Paths, out: Path) -> None:
    """--output-dir under a regular file: unwritable even for root (tests run as root, chmod stops
    nothing)."""
    out.parent.rmdir()
    out.parent.write_text("a regular file where a folder is needed\n")


def _fused_exists(p: Paths, out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text("{}")


def _export_exists(p: Paths, out: Path) -> None:
    out.mkdir()
    (out / "Modelfile").write_text("FROM ./run.gguf\n")


CASES = {
    # ---- train: data
    "train-malformed-json": Case(
        "train",
        lambda p, o: _train(p, o, data="malformed.json"),
        ("malformed.json:3:23: invalid JSON", "Expecting ',' delimiter", "fix"),
    ),
    "train-jsonl-bad-line": Case(
        "train",
        lambda p, o: _train(p, o, data="bad_line.jsonl"),
        ("bad_line.jsonl:4:", "invalid JSON", "fix that line"),
    ),
    "train-gbk-encoding": Case(
        "train",
        lambda p, o: _train(p, o, data="gbk.json"),
        ("gbk.json: not UTF-8", "line 1", "save the file as UTF-8"),
    ),
    "train-empty-file": Case(
        "train",
        lambda p, o: _train(p, o, data="empty.json"),
        ("empty.json: the file is empty", "JSON array"),
    ),
    "train-blank-jsonl": Case(
        "train", lambda p, o: _train(p, o, data="blank.jsonl"), ("blank.jsonl: the file is empty",)
    ),
    "train-missing-fields": Case(
        "train",
        lambda p, o: _train(p, o, data="no_fields.json"),
        (
            "no_fields.json: all 3 records were skipped",
            "missing or empty fields",
            "alpaca",
            "fix the data",
        ),
    ),
    "train-unknown-format": Case(
        "train",
        lambda p, o: _train(p, o, data="unknown.json"),
        ("unknown record format", "keys seen: question, answer", "expected alpaca"),
    ),
    "train-not-an-array": Case(
        "train",
        lambda p, o: _train(p, o, data="scalar.json"),
        ("scalar.json: expected a JSON array", "int"),
    ),
    "train-data-missing": Case(
        "train",
        lambda p, o: _train(p, o) + ["--data", o.parent / "nope.json"],
        ("data file", "nope.json not found", "--data FILE"),
    ),
    "train-truncation-leaves-no-answer": Case(
        "train",
        lambda p, o: _train(p, o, "--max-seq-length", 16, data="long_prompt.json"),
        ("no record keeps an answer token within --max-seq-length 16", "raise --max-seq-length"),
    ),
    # ---- train: numbers and names
    "train-max-seq-length-0": Case(
        "train",
        lambda p, o: _train(p, o, "--max-seq-length", 0),
        ("--max-seq-length must be at least 2, got 0",),
    ),
    "train-negative-lr": Case(
        "train",
        lambda p, o: _train(p, o, "--learning-rate=-1e-4"),
        ("--learning-rate must be > 0, got -0.0001",),
    ),
    "train-zero-lr": Case(
        "train",
        lambda p, o: _train(p, o, "--learning-rate", 0),
        ("--learning-rate must be > 0, got 0.0",),
    ),
    "train-zero-batch": Case(
        "train",
        lambda p, o: _train(p, o, "--per-device-train-batch-size", 0),
        ("--per-device-train-batch-size must be > 0, got 0",),
    ),
    "train-zero-accumulation": Case(
        "train",
        lambda p, o: _train(p, o, "--gradient-accumulation-steps", 0),
        ("--gradient-accumulation-steps must be > 0",),
    ),
    "train-batch-larger-than-data": Case(
        "train",
        lambda p, o: _train(p, o, "--per-device-train-batch-size", 1000),
        ("larger than the 135 training examples", "lower it"),
    ),
    "train-unknown-target-modules": Case(
        "train",
        lambda p, o: _train(p, o, "--target-modules", "q,qkv,c_attn"),
        (
            "unknown target module(s) qkv, c_attn",
            "this model has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
    ),
    "train-flag-not-a-number": Case(
        "train",
        lambda p, o: _train(p, o, "--max-steps", "ten"),
        ("argument --max-steps: invalid int value: 'ten'", "--help"),
    ),
    "train-unknown-flag": Case(
        "train",
        lambda p, o: _train(p, o, "--lerning-rate", "1e-4"),
        ("unrecognized arguments: --lerning-rate", "--help"),
    ),
    # ---- train: model folders
    "train-model-without-weights": Case(
        "train",
        lambda p, o: _train(p, o, model=p.no_weights),
        ("no-weights has no *.safetensors weights", "complete model folder"),
    ),
    "train-model-missing-shard": Case(
        "train",
        lambda p, o: _train(p, o, model=p.missing_shard),
        (
            "missing weight shard(s) model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "redo the download",
        ),
    ),
    "train-model-dir-missing": Case(
        "train",
        lambda p, o: _train(p, o, model=o.parent / "no-such-model"),
        ("model folder", "does not exist", "--model"),
    ),
    "train-unsupported-architecture": Case(
        "train",
        lambda p, o: _train(p, o, model=p.bigcode),
        ("cannot load the model in", "does not fit model_type 'gpt_bigcode'", "re-download"),
    ),
    "train-unknown-architecture": Case(
        "train",
        lambda p, o: _train(p, o, model=p.unknown_arch),
        ("cannot load the model in", "frobnicator not supported"),
    ),
    # ---- train: output folder
    "train-output-dir-not-writable": Case(
        "train",
        lambda p, o: _train(p, o),
        ("cannot write to --output-dir", "Not a directory", "choose a writable folder"),
        _file_in_the_way,
    ),
    "train-output-dir-has-finished-run": Case(
        "train",
        lambda p, o: _train(p, o),
        ("holds a finished run", "--overwrite-output-dir", "another --output-dir"),
        _finished_run,
    ),
    "train-output-dir-has-unfinished-run": Case(
        "train",
        lambda p, o: _train(p, o),
        ("holds an unfinished run (checkpoint-2)", "--resume to continue it"),
        _unfinished_run,
    ),
    "train-resume-without-checkpoint": Case(
        "train",
        lambda p, o: _train(p, o, "--resume"),
        ("--resume: no complete checkpoint", "start without --resume"),
    ),
    # ---- chat
    "chat-adapter-from-another-base": Case(
        "chat",
        lambda p, o: ["--model", p.other, "--adapter", p.run, "--prompt", "hi"],
        ("was trained on another base", "hidden_size 64, this model 96", "with --model"),
    ),
    "chat-adapter-without-weights": Case(
        "chat",
        lambda p, o: ["--model", p.model, "--adapter", p.adapter_no_weights, "--prompt", "hi"],
        ("has no adapter_model.safetensors", "--resume"),
    ),
    "chat-adapter-missing": Case(
        "chat",
        lambda p, o: ["--model", p.model, "--adapter", o.parent / "nope", "--prompt", "hi"],
        ("is not a folder", "--output-dir of a training run"),
    ),
    "chat-unknown-architecture": Case(
        "chat",
        lambda p, o: ["--model", p.unknown_arch, "--prompt", "hi"],
        ("frobnicator not supported",),
    ),
    "chat-model-missing-shard": Case(
        "chat",
        lambda p, o: ["--model", p.missing_shard, "--prompt", "hi"],
        ("missing weight shard(s)",),
    ),
    "chat-zero-max-tokens": Case(
        "chat",
        lambda p, o: ["--model", p.model, "--max-tokens", 0, "--prompt", "hi"],
        ("--max-tokens must be at least 1",),
    ),
    # ---- fuse
    "fuse-adapter-from-another-base": Case(
        "fuse",
        lambda p, o: ["--model", p.other, "--adapter", p.run, "--output-dir", o],
        ("hidden_size 64, this model 96", "trained on another base"),
    ),
    "fuse-adapter-without-weights": Case(
        "fuse",
        lambda p, o: ["--model", p.model, "--adapter", p.adapter_no_weights, "--output-dir", o],
        ("has no adapter_model.safetensors",),
    ),
    "fuse-output-dir-not-writable": Case(
        "fuse",
        lambda p, o: ["--model", p.model, "--adapter", p.run, "--output-dir", o],
        ("cannot write to --output-dir", "choose a writable folder"),
        _file_in_the_way,
    ),
    "fuse-output-dir-exists": Case(
        "fuse",
        lambda p, o: ["--model", p.model, "--adapter", p.run, "--output-dir", o],
        ("already exists", "--overwrite"),
        _fused_exists,
    ),
    "fuse-model-without-weights": Case(
        "fuse",
        lambda p, o: ["--model", p.no_weights, "--adapter", p.run, "--output-dir", o],
        ("has no *.safetensors weights",),
    ),
    # ---- export
    "export-adapter-from-another-base": Case(
        "export",
        lambda p, o: ["--model", p.other, "--adapter", p.run, "--output-dir", o],
        ("hidden_size 64, this model 96", "trained on another base"),
    ),
    "export-adapter-mode-from-another-base": Case(
        "export",
        lambda p, o: [
            "--model",
            p.other,
            "--adapter",
            p.run,
            "--output-dir",
            o,
            "--mode",
            "adapter",
        ],
        ("hidden_size 64, this model 96", "trained on another base"),
    ),
    "export-adapter-without-weights": Case(
        "export",
        lambda p, o: ["--model", p.model, "--adapter", p.adapter_no_weights, "--output-dir", o],
        ("has no adapter_model.safetensors",),
    ),
    "export-output-dir-not-writable": Case(
        "export",
        lambda p, o: ["--model", p.model, "--adapter", p.run, "--output-dir", o],
        ("cannot write to --output-dir", "choose a writable folder"),
        _file_in_the_way,
    ),
    "export-output-dir-has-export": Case(
        "export",
        lambda p, o: ["--model", p.model, "--adapter", p.run, "--output-dir", o, "--name", "run"],
        ("Modelfile already exists", "--overwrite"),
        _export_exists,
    ),
    "export-bad-name": Case(
        "export",
        lambda p, o: [
            "--model",
            p.model,
            "--adapter",
            p.run,
            "--output-dir",
            o,
            "--name",
            "my model",
        ],
        ("--name 'my model' must be letters, digits",),
    ),
    "export-missing-shard": Case(
        "export",
        lambda p, o: ["--model", p.missing_shard, "--output-dir", o],
        ("missing weight shard(s)",),
    ),
    # ---- serve (the port-in-use case is a test of its own below)
    "serve-adapter-from-another-base": Case(
        "serve",
        lambda p, o: ["--model", p.other, "--adapter", p.run, "--port", 0],
        ("was trained on another base", "with --model"),
    ),
    "serve-adapter-without-weights": Case(
        "serve",
        lambda p, o: ["--model", p.model, "--adapter", p.adapter_no_weights, "--port", 0],
        ("has no adapter_model.safetensors",),
    ),
    "serve-port-out-of-range": Case(
        "serve",
        lambda p, o: ["--model", p.model, "--port", 70000],
        ("--port must be between 0 and 65535", "got 70000"),
    ),
    "serve-zero-max-tokens": Case(
        "serve",
        lambda p, o: ["--model", p.model, "--max-tokens", 0, "--port", 0],
        ("--max-tokens must be at least 1",),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_input(name, p, tmp_path):
    case = CASES[name]
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    if case.setup is not None:
        case.setup(p, out)
    before = snapshot(tmp_path)
    r = cli(case.cmd, *case.args(p, out))
    assert_user_error(r, *case.needles)
    assert snapshot(tmp_path) == before, "the failed command left files behind"


def test_matrix_is_large_enough():
    cmds = {c.cmd for c in CASES.values()}
    assert len(CASES) + 1 >= 25 and cmds == {"train", "chat", "fuse", "export", "serve"}


def test_serve_port_in_use(p):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--model", p.model, "--port", port)
    assert_user_error(r, f"port {port} is in use", "pass --port")


def test_over_long_rows_are_truncated_and_reported(p, tmp_path):
    """Not an error: rows longer than --max-seq-length are cut, counted and the run goes on."""
    out = tmp_path / "out"
    r = cli("train", *_train(p, out, "--max-seq-length", 40))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = next(line for line in r.stdout.splitlines() if line.startswith("data: "))
    assert "135 records (alpaca)" in summary
    assert (
        " truncated to 40 tokens" in summary
        and "dropped (no answer left after truncation)" in summary
    )
    assert (out / "adapter_model.safetensors").is_file()


def test_finished_run_is_left_byte_identical(p, tmp_path):
    """Refusing to overwrite must not touch the finished run (checked byte for byte, not just by
    mtime)."""
    out = tmp_path / "out"
    shutil.copytree(p.run, out)
    before = {f: (out / f).read_bytes() for f in snapshot(out)}
    assert_user_error(cli("train", *_train(p, out)), "holds a finished run")
    assert {f: (out / f).read_bytes() for f in snapshot(out)} == before


# ----------------------------------------------------------------------- in-process: disk full, NaN


def _cfg(model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=str(SAMPLE_DATA),
        output_dir=str(out),
        max_steps=6,
        save_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lora_dropout=0.0,
        max_seq_length=128,
        plot=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _complete_checkpoints(out: Path) -> list[str]:
    from mlx_lora.train.checkpoint import checkpoints

    return [c.name for c in checkpoints(out)]


def _assert_loads(ckpt: Path, model: Path) -> None:
    """A checkpoint folder is a usable adapter: it loads onto the base and its tensors are
    finite."""
    from mlx_lora.model.load import load_for_inference
    from mlx_lora.model.lora import read_adapter

    tensors = read_adapter(ckpt).tensors
    assert all(mx.isfinite(v).all().item() for v in tensors.values())
    mx.load(str(ckpt / "optimizer.safetensors"))
    json.loads((ckpt / "trainer_state.json").read_text())
    load_for_inference(str(model), ckpt)


def _full_disk_writer(
    monkeypatch, fail_when: Callable[[str, int], bool], exc: BaseException
) -> list[str]:
    """Patch ``mx.save_safetensors`` to write half a file and raise, like a disk that fills up."""
    real = mx.save_safetensors
    calls: list[str] = []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if fail_when(path, len(calls)):
            real(path, arrays, metadata=metadata) if metadata else real(path, arrays)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise exc
        return real(path, arrays, metadata=metadata) if metadata else real(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", save)
    return calls


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[write] Unable to write 69000 bytes to file."),
    ],
    ids=["OSError", "mlx-RuntimeError"],
)
def test_disk_full_while_writing_a_checkpoint(tiny_model, tmp_path, monkeypatch, exc):
    out = tmp_path / "out"
    # checkpoint-2 writes adapter + optimizer (calls 1, 2); checkpoint-4's optimizer state (call 4)
    # hits the full disk
    _full_disk_writer(monkeypatch, lambda path, n: n == 4, exc)
    with pytest.raises(
        MlxLoraError,
        match=r"cannot write checkpoint .*checkpoint-4 \((No space left on device|\[write\] "
        r"Unable to write .*)\); "
        r"free disk space and --resume",
    ) as e:
        train(_cfg(tiny_model, out), progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"], (
        "temp folders or files left behind"
    )
    assert _complete_checkpoints(out) == ["checkpoint-2"]
    monkeypatch.undo()
    _assert_loads(out / "checkpoint-2", tiny_model)
    resumed = train(_cfg(tiny_model, out, resume="latest"), progress=False)  # the advice works
    assert resumed.global_step == 6


def test_disk_full_while_writing_the_final_adapter(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _full_disk_writer(
        monkeypatch,
        lambda path, n: Path(path).parent == out and ".adapter_model" in path,
        OSError(errno.ENOSPC, "No space left on device"),
    )
    with pytest.raises(
        MlxLoraError,
        match=r"cannot write the adapter to .* \(No space left on device\); free disk space and "
        r"--resume \(from .*checkpoint-6\)",
    ):
        train(_cfg(tiny_model, out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    monkeypatch.undo()
    resumed = train(_cfg(tiny_model, out, resume="latest"), progress=False)
    assert resumed.global_step == 6 and (out / "adapter_model.safetensors").is_file()


def test_really_full_disk(tiny_model, tmp_path):
    """A real 300 KB tmpfs: checkpoint-2 (~210 KB) fits, checkpoint-4 does not. Needs root and
    mount."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "out"
        with pytest.raises(
            MlxLoraError,
            match=r"cannot write checkpoint .*checkpoint-4 \(.*\); free disk space and --resume",
        ):
            train(_cfg(tiny_model, out), progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
        _assert_loads(out / "checkpoint-2", tiny_model)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_while_fusing(p, tmp_path, monkeypatch):
    from mlx_lora.export.fuse import fuse

    _full_disk_writer(
        monkeypatch,
        lambda path, n: True,
        RuntimeError("[write] Unable to write 1134557 bytes to file."),
    )
    with pytest.raises(
        MlxLoraError,
        match=r"cannot write the fused model to .*fused \(\[write\] Unable to write .*\); free "
        r"disk space",
    ):
        fuse(str(p.model), p.run, tmp_path / "fused")
    assert list(tmp_path.iterdir()) == [], "the temp folder of the fused model was left behind"


def test_disk_full_during_export_removes_what_it_wrote(p, tmp_path, monkeypatch):
    """Adapter mode writes the LoRA GGUF, then the base GGUF; a full disk at the second leaves
    neither."""
    import mlx_lora.export.pipeline as export_module

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "write_gguf", full)
    out = tmp_path / "export"
    cfg = export_module.ExportConfig(
        model=str(p.model), adapter=str(p.run), output_dir=str(out), mode="adapter"
    )
    with pytest.raises(
        MlxLoraError,
        match=r"cannot write the export to .*export \(No space left on device\); free disk space",
    ):
        export_module.export(cfg, progress=False, log=False)
    assert list(out.iterdir()) == [], "a half-finished export was left behind"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_loss_turning_nan_stops_and_names_the_last_good_checkpoint(
    tiny_model, tmp_path, monkeypatch, bad
):
    """The loss diverges at step 5 (poisoned loss weights, which reach the compiled step as
    data)."""
    import mlx_lora.train.loop as train_module

    real = train_module.batch_arrays
    calls = {"n": 0}

    def poisoned(b):  # one call per step here (batch 2, no accumulation, no eval)
        calls["n"] += 1
        arrays = real(b)
        return (*arrays[:-1], arrays[-1] * bad) if calls["n"] == 5 else arrays

    monkeypatch.setattr(train_module, "batch_arrays", poisoned)
    out = tmp_path / "out"
    with pytest.raises(MlxLoraError) as e:
        train(_cfg(tiny_model, out), progress=False)
    msg = str(e.value)
    assert re.search(r"loss became (nan|inf) at step 5; training stopped", msg), msg
    assert (
        f"the last good checkpoint is {out / 'checkpoint-4'}" in msg
        and "--resume" in msg
        and "\n" not in msg
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    _assert_loads(out / "checkpoint-4", tiny_model)
    monkeypatch.undo()
    assert (
        train(
            _cfg(tiny_model, out, resume="latest", learning_rate=5e-4), progress=False
        ).global_step
        == 6
    )


# -------------------------------------------------------------------------- malformed HTTP requests


@pytest.fixture(scope="module")
def server(p):
    from mlx_lora.infer.serve import make_server
    from mlx_lora.model.load import load_for_inference

    srv = make_server(load_for_inference(str(p.model)), "127.0.0.1", 0, "tiny", quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(
    port: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/v1/chat/completions",
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


GOOD = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 3,
    "temperature": 0,
}
HTTP_CASES = {  # what tests/test_serve.py does not cover yet
    "body-not-utf8": (400, "\xff\xfe{}".encode("latin-1"), {}, None),
    "n-2": (400, json.dumps({**GOOD, "n": 2}).encode(), {}, "n"),
    "stream-not-bool": (400, json.dumps({**GOOD, "stream": "yes"}).encode(), {}, "stream"),
    "stream-options-not-object": (
        400,
        json.dumps({**GOOD, "stream": True, "stream_options": [1]}).encode(),
        {},
        "stream_options",
    ),
    "image-part": (
        400,
        json.dumps(
            {
                **GOOD,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            }
        ).encode(),
        {},
        "messages.[0].content",
    ),
    "message-not-object": (
        400,
        json.dumps({**GOOD, "messages": ["hi"]}).encode(),
        {},
        "messages.[0]",
    ),
    "seed-too-large": (400, json.dumps({**GOOD, "seed": 1 << 70}).encode(), {}, "seed"),
    "temperature-bool": (
        400,
        json.dumps({**GOOD, "temperature": True}).encode(),
        {},
        "temperature",
    ),
    "max-tokens-float": (400, json.dumps({**GOOD, "max_tokens": 2.5}).encode(), {}, "max_tokens"),
    "stop-too-many": (
        400,
        json.dumps({**GOOD, "stop": ["a", "b", "c", "d", "e"]}).encode(),
        {},
        "stop",
    ),
    "bad-content-length": (400, b"{}", {"Content-Length": "abc"}, None),
    "body-too-large": (413, b"{}", {"Content-Length": str(64 * 1024 * 1024)}, None),
    "chunked-body": (411, b"2\r\n{}\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}, None),
}


@pytest.mark.parametrize("name", list(HTTP_CASES))
def test_malformed_request_gets_an_openai_error_and_the_server_keeps_serving(server, name):
    status, body, headers, param = HTTP_CASES[name]
    port = server.server_address[1]
    got, data = _request(port, body, headers)
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["param"] == param
    ok, answer = _request(port, json.dumps(GOOD).encode())
    assert ok == 200 and answer["usage"]["completion_tokens"] <= 3


def test_bad_request_then_good_request_on_one_keep_alive_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        for body, status in (
            (b"{oops", 400),
            (json.dumps(GOOD).encode(), 200),
            (b"[]", 400),
            (json.dumps(GOOD).encode(), 200),
        ):
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=body,
                headers={"Content-Type": "application/json"},
            )
            r = conn.getresponse()
            assert r.status == status and json.loads(r.read())
    finally:
        conn.close()


def test_garbage_on_the_socket_does_not_stop_the_server(server):
    port = server.server_address[1]
    for junk in (
        b"\x00\x01\x02 garbage\r\n\r\n",
        b'POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"mod',
        b"",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)  # a client that gives up half-way
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    ok, answer = _request(port, json.dumps(GOOD).encode())
    assert ok == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_client_resetting_its_connection_is_no_server_traceback(server, capfd):
    port = server.server_address[1]
    for partial in (
        b"POST /v1/chat/comp",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{",
    ):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(partial)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST instead of FIN: the server's read fails with ECONNRESET
    ok, _ = _request(port, json.dumps(GOOD).encode())
    assert ok == 200
    assert "Traceback" not in capfd.readouterr().err
