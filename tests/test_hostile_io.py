"""Nothing lost: an output folder that overlaps an input is refused; a huge record is cut before
it is tokenized; a Gemma 3 folder without ``tie_word_embeddings`` exports (issue 25)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SAMPLE_DATA, make_tiny_model

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import check_apart
from mlx_lora.data.dataset import MAX_CHARS_PER_TOKEN, encode_record, load_dataset
from mlx_lora.model.load import load_base_tokenizer
from mlx_lora.testing.adapter import random_adapter


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
    )


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("io") / "model")


# ------------------------------------------------------------------ output folders vs inputs


@pytest.mark.parametrize(
    "where",
    ["model itself", "inside the model", "model's parent", "data's folder", "data file itself"],
)
def test_train_refuses_an_output_folder_over_its_inputs(model, tmp_path, where):
    """``--overwrite-output-dir`` would delete what the model or data folder holds."""
    work = tmp_path / "work"
    m = Path(shutil.copytree(model, work / "m"))
    data = work / "data" / "d.json"
    data.parent.mkdir()
    shutil.copy(SAMPLE_DATA, data)
    out = {
        "model itself": m,
        "inside the model": m / "run",
        "model's parent": work,
        "data's folder": data.parent,
        "data file itself": data,
    }[where]
    before = _digest(work)
    args = ["mlx_lora.train", "--model", str(m), "--data", str(data), "--output-dir", str(out)]
    r = _cli(*args, "--overwrite-output-dir", "--max-steps", "1")
    _one_line_error(r, "--output-dir", "choose a separate folder")
    assert _digest(work) == before  # nothing deleted, nothing written
    assert not (m / "run").exists()


def test_train_refuses_an_eval_data_inside_the_output(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(SAMPLE_DATA, out / "val.json")
    args = ["mlx_lora.train", "--model", str(model), "--data", str(SAMPLE_DATA)]
    r = _cli(
        *args, "--eval-data", str(out / "val.json"), "--output-dir", str(out), "--max-steps", "1"
    )
    _one_line_error(r, "contains --eval-data")
    assert sorted(p.name for p in out.iterdir()) == ["val.json"]


@pytest.mark.parametrize("where", ["base", "adapter", "inside the base"])
def test_fuse_refuses_to_replace_its_base_or_adapter(model, tmp_path, where):
    base = Path(shutil.copytree(model, tmp_path / "base"))
    adapter = random_adapter(base, tmp_path / "adapter")
    out = {"base": base, "adapter": adapter, "inside the base": base / "fused"}[where]
    before = _digest(tmp_path)
    args = ["mlx_lora.fuse", "--model", str(base), "--adapter", str(adapter)]
    r = _cli(*args, "--output-dir", str(out), "--overwrite")
    _one_line_error(r, "--output-dir", "choose a separate folder")
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_export_refuses_an_output_folder_over_its_inputs(model, tmp_path, where):
    base = Path(shutil.copytree(model, tmp_path / "base"))
    adapter = random_adapter(base, tmp_path / "adapter")
    out = {"base": base, "adapter": adapter}[where]
    before = _digest(tmp_path)
    args = ["mlx_lora.export", "--model", str(base), "--adapter", str(adapter), "--overwrite"]
    r = _cli(*args, "--output-dir", str(out), "--gguf-type", "f32")
    _one_line_error(r, "--output-dir", "choose a separate folder")
    assert _digest(tmp_path) == before


def test_check_apart_cases(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    fine = [tmp_path / "out", tmp_path / "m2", tmp_path / "mx" / "m"]
    for out in fine:
        check_apart(out, {"--model": tmp_path / "m", "--data": tmp_path / "d.json"})
    check_apart(tmp_path / "out", {"--model": None, "--data": tmp_path / "absent.json"})
    bad = {
        tmp_path / "m": "is",
        tmp_path / "link": "is",  # a symlink to the model is the model
        tmp_path / "m" / "a" / "b": "lies inside",
        tmp_path: "contains",
        tmp_path / "d.json": "is",
    }
    for out, how in bad.items():
        with pytest.raises(MlxLoraError, match=f"{how} --(model|data)"):
            check_apart(out, {"--model": tmp_path / "m", "--data": tmp_path / "d.json"})


# ------------------------------------------------------------------ a huge record


PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from mlx_lora.data.dataset import load_dataset
from mlx_lora.model.load import load_base_tokenizer
from mlx_lora.train.report import peak_rss_bytes
tok = load_base_tokenizer(Path(sys.argv[1]))
ds = load_dataset(Path(sys.argv[2]), tok, max_seq_length=64)
print(json.dumps({"peak": peak_rss_bytes(), "ids": ds.examples[0].ids, "truncated": ds.truncated}))
"""


def _load_in_child(model: Path, data: Path) -> dict:
    """load_dataset in a process of its own: its peak resident memory (VmHWM) is its own."""
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(model), str(data)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_huge_record_is_cut_before_tokenizing(model, tmp_path):
    """A 21 M-character answer with --max-seq-length 64: tokenized whole it costs gigabytes, only
    to be truncated; cut at 64 × MAX_CHARS_PER_TOKEN characters first, it costs what a small
    record does, and the kept tokens are the same."""
    huge = "臣妾做不到啊。" * 3_000_000
    small = {"instruction": "你是谁？", "output": "我是甄嬛，家父是大理寺少卿甄远道。"}
    data, base = tmp_path / "huge.json", tmp_path / "small.json"
    data.write_text(json.dumps([{"instruction": "你是谁？", "output": huge}, small]), "utf-8")
    short = {"instruction": "你是谁？", "output": huge[:2000]}
    base.write_text(json.dumps([short, small]), "utf-8")
    got, ref = _load_in_child(model, data), _load_in_child(model, base)
    # the file itself (63 MB of UTF-8, parsed: ~150 MB) is read; tokenizing it would be GBs
    assert got["peak"] - ref["peak"] < 400 << 20, (got["peak"], ref["peak"])
    assert got["truncated"] == 1 and got["ids"] == ref["ids"] and len(got["ids"]) == 64
    # the first 64 ids are exactly those of the record cut much later (no cut effect reaches back)
    tok = load_base_tokenizer(model)
    longer = {"instruction": "你是谁？", "output": huge[: 64 * MAX_CHARS_PER_TOKEN * 4]}
    enc = encode_record(longer, "alpaca", tok, system_prompt=None, eot="<|im_end|>")
    assert enc.ids[:64] == got["ids"]


def test_many_huge_messages_are_cut_in_order(model, tmp_path):
    tok = load_base_tokenizer(model)
    turns = []
    for i in range(50):  # 50 turns of ~200 k characters each: 10 M characters
        turns += [{"role": "user", "content": "你是谁？" if i == 0 else "问" * 100_000}]
        turns += [{"role": "assistant", "content": "答" * 100_000}]
    data = tmp_path / "turns.jsonl"
    data.write_text(json.dumps({"messages": turns}, ensure_ascii=False) + "\n", "utf-8")
    ds = load_dataset(data, tok, max_seq_length=128)
    assert ds.truncated == 1 and len(ds.examples[0].ids) == 128
    assert len(ds.sources[0]) == 100  # the conversation keeps its shape
    assert sum(len(m["content"]) for m in ds.sources[0]) <= 128 * MAX_CHARS_PER_TOKEN + 100


# ------------------------------------------------------------------ Gemma 3, tying from weights


def test_gemma3_without_tie_key_exports_and_verifies(tmp_path):
    """Gemma 3 folders may omit tie_word_embeddings (transformers' default is True): the writer
    decides from the weights, as the importer does, instead of demanding output.weight."""
    pytest.importorskip("llama_cpp", reason='verify needs pip install "mlx_lora[verify]"')
    from mlx_lora.export.pipeline import ExportConfig, export

    base = make_tiny_model(tmp_path / "gemma3", arch="gemma3_text")
    cfg_path = base / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg.pop("tie_word_embeddings", True) is True
    cfg_path.write_text(json.dumps(cfg))
    adapter = random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "export"
    r = export(
        ExportConfig(
            adapter=str(adapter), model=str(base), output_dir=str(out), gguf_type="f32", verify=True
        ),
        progress=False,
        log=False,
    )
    assert r.report.ok, r.report.table()
