"""The shipped dataset sample is the default training file; the download script fetches the full
set.

The sample must be loadable as the huanhuan (alpaca) format, and the download script must never
leave
a partial or bogus file behind, whatever the network does.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "dataset" / "huanhuan.json"
SCRIPT = REPO / "scripts" / "download_dataset.py"
REAL = REPO.parent / "shared" / "data" / "huanhuan.json"


def load_script():
    spec = importlib.util.spec_from_file_location("download_dataset", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dl = load_script()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads(SAMPLE.read_bytes().decode("utf-8"))


def test_sample_shape(records: list[dict]) -> None:
    assert isinstance(records, list) and len(records) >= 120
    for rec in records:
        assert set(rec) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["instruction"].strip() and rec["output"].strip()
    assert sum(1 for r in records if r["input"]) >= 3


def test_sample_has_identity_priming(records: list[dict]) -> None:
    identity = [r for r in records if "甄嬛" in r["output"] or "甄远道" in r["output"]]
    assert len(identity) >= 8
    assert {
        "instruction": "你是谁？",
        "input": "",
        "output": "我是甄嬛，家父是大理寺少卿甄远道。",
    } in records


def test_sample_file_format(records: list[dict]) -> None:
    """indent 2, real UTF-8 (no \\u escapes), trailing newline: diffs stay readable."""
    text = SAMPLE.read_text(encoding="utf-8")
    assert text == json.dumps(records, ensure_ascii=False, indent=2) + "\n"


@pytest.mark.skipif(not REAL.is_file(), reason="../shared/data/huanhuan.json absent")
def test_sample_is_not_copied_from_the_public_set(records: list[dict]) -> None:
    real = json.loads(REAL.read_text(encoding="utf-8"))
    real_pairs = {(r["instruction"], r["output"]) for r in real}
    ours = {(r["instruction"], r["output"]) for r in records}
    # only the identity line, a fact of the show, may coincide
    assert ours & real_pairs <= {("你是谁？", "我是甄嬛，家父是大理寺少卿甄远道。")}


# ---------------------------------------------------------------- download script


def test_download_offline_exit_2_and_no_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "huanhuan.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--url", "http://127.0.0.1:9/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download http://127.0.0.1:9/x")
    assert "--url" in lines[0] and str(out) in lines[0]
    assert not out.exists() and not out.parent.exists()


def test_download_file_url_writes_exact_bytes(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src.json"
    src.write_bytes(SAMPLE.read_bytes())
    out = tmp_path / "out" / "huanhuan.json"
    assert dl.main(["--out", str(out), "--url", src.as_uri()]) == 0
    assert out.read_bytes() == src.read_bytes()
    n = len(json.loads(src.read_text(encoding="utf-8")))
    assert f"{n} records" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["huanhuan.json"]


@pytest.mark.parametrize(
    "body",
    [
        b"<html>404</html>",
        b'{"instruction": "a", "output": "b"}',
        b"[]",
        b'[{"instruction": "a"}]',
        b'[{"instruction": "a", "output": "b"',  # truncated
    ],
)
def test_download_rejects_bad_content_and_keeps_old_file(
    tmp_path: Path, body: bytes, capsys
) -> None:
    src = tmp_path / "bad.json"
    src.write_bytes(body)
    out = tmp_path / "huanhuan.json"
    out.write_text("old", encoding="utf-8")
    assert dl.main(["--out", str(out), "--url", src.as_uri()]) == 2
    assert out.read_text(encoding="utf-8") == "old"
    assert "cannot download" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "huanhuan.json"]


def test_download_error_is_user_error() -> None:
    assert issubclass(dl.DownloadError, dl.MlxLoraError)
    assert dl.DEFAULT_URL.startswith("https://raw.githubusercontent.com/datawhalechina/self-llm/")
    assert dl.DEFAULT_OUT == SAMPLE
