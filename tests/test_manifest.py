"""``export.json`` is one dataclass: the pipeline writes it, verify adds its report to it, and the
studio reads it (and offers the GGUF types the CLI accepts) without parsing console text."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.export.pipeline import MODELFILE, ExportConfig, export
from mlx_lora.testing.adapter import random_adapter
from mlx_lora.testing.tiny_model import make_tiny_model
from mlx_lora.verify.manifest import MANIFEST, Manifest

# The keys export.json has always had, in the file's order (verify adds quality and verify).
KEYS = [
    "name", "format", "mode", "gguf_type", "gguf", "lora_gguf", "mlx_dir", "hf_dir", "base_dir",
    "adapter", "modelfile", "num_ctx", "system_prompt", "stops", "quantization", "eval_data",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A verified f32 export of a tiny model with a random adapter."""
    work = tmp_path_factory.mktemp("manifest")
    base = make_tiny_model(work / "tiny")
    adapter = random_adapter(base, work / "adapter", seed=3)
    cfg = ExportConfig(
        adapter=str(adapter),
        output_dir=str(work / "out"),
        gguf_type="f32",
        name="tiny",
        verify=True,
    )
    return export(cfg, progress=False, log=False)


def test_manifest_round_trip(exported, tmp_path):
    out = exported.output_dir
    raw = (out / MANIFEST).read_bytes()
    data = json.loads(raw)
    assert list(data) == [*KEYS, "verify"]  # no quality for f32: nothing was quantized
    m = Manifest.read(out)
    assert m.to_dict() == data
    assert (m.name, m.format, m.mode, m.gguf_type) == ("tiny", "gguf", "full", "f32")
    # Paths inside the export folder stay relative, the others absolute, as written.
    assert (m.gguf, m.hf_dir, m.modelfile, m.lora_gguf) == ("tiny.gguf", "tiny-hf", MODELFILE, None)
    assert Path(m.base_dir).is_absolute() and Path(m.adapter).is_absolute()
    assert m.path(out, "gguf") == exported.gguf and m.path(out, "modelfile") == exported.modelfile
    assert m.path(out, "base_dir") == exported.base_dir and m.path(out, "mlx_dir") is None
    assert m.stops == exported.stops and m.system_prompt == exported.system_prompt
    # Written again: byte for byte the same file.
    assert m.write(tmp_path) == tmp_path / MANIFEST
    assert (tmp_path / MANIFEST).read_bytes() == raw
    # Before verify has run the file has exactly the keys it always had.
    fresh = dataclasses.replace(m, verify=None, quality=None).to_dict()
    assert list(fresh) == KEYS


def test_verify_report_is_in_the_manifest(exported):
    report = exported.report
    v = Manifest.read(exported.output_dir).verify
    assert v is not None and v == report.to_dict() and v["ok"] is report.ok is True
    assert v["target"] == "tiny.gguf" and v["gguf_type"] == "f32"
    assert [(c["name"], c["status"], c["figures"]) for c in v["checks"]] == [
        (c.name, c.status, c.figures) for c in report.checks
    ]
    assert any(c["name"].startswith("GGUF read back") and c["status"] == "ok" for c in v["checks"])
    json.dumps(v)  # plain JSON: numpy figures became numbers


def test_verify_cli_records_its_report_and_prints_the_same_table(exported, tmp_path, capsys):
    from mlx_lora.verify.__main__ import main

    out = tmp_path / "copy"
    shutil.copytree(exported.output_dir, out)
    m = Manifest.read(out)
    m.verify = None
    m.write(out)
    report = main(["--export-dir", str(out)])
    assert capsys.readouterr().out == report.table() + "\n"
    assert Manifest.read(out).verify == report.to_dict()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "has no export.json: pass a folder written by python -m mlx_lora.export"),
        ("{not json", "export.json: not valid JSON"),
        ("[1, 2]", "export.json: expected a JSON object, got list"),
        ('{"name": "x"}', "export.json: not an export manifest \\(missing format, mode"),
        ("stops", 'export.json: stops is "oops", expected a list of strings'),
        ("num_ctx", "export.json: num_ctx is true, expected a number or null"),
    ],
)
def test_missing_or_malformed_manifest_is_one_line(exported, tmp_path, text, match):
    if text in ("stops", "num_ctx"):  # an otherwise good file with one wrong value
        data = json.loads((exported.output_dir / MANIFEST).read_text())
        data[text] = "oops" if text == "stops" else True
        text = json.dumps(data)
    if text is not None:
        (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(MlxLoraError, match=match) as e:
        Manifest.read(tmp_path)
    assert "\n" not in str(e.value) and (
        text is None or "re-run python -m mlx_lora.export" in str(e.value)
    )


def test_studio_offers_the_clis_gguf_types(tmp_path):
    from mlx_lora.config import build_parser
    from mlx_lora.studio.api import Studio, info
    from mlx_lora.studio.jobs import Jobs
    from mlx_lora.studio.paths import Roots

    parser = build_parser(ExportConfig, "python -m mlx_lora.export", "")
    cli = next(a.choices for a in parser._actions if a.dest == "gguf_type")
    studio = Studio(Roots([tmp_path]), Jobs(tmp_path, print))
    try:
        offered = info(studio)["gguf_types"]
    finally:
        studio.chat.close()
    assert offered == list(cli) and len(offered) > 4
    assert {"f16", "q8_0", "q4_k_m", "q6_k"} <= set(offered)


def test_studio_shows_the_recorded_report(exported, tmp_path):
    from mlx_lora.studio.api import Studio, export_result
    from mlx_lora.studio.jobs import Job, Jobs
    from mlx_lora.studio.paths import Roots

    out = exported.output_dir
    studio = Studio(Roots([out.parent]), Jobs(out.parent, print))
    try:
        job = Job("export-1", "export", "mlx_lora.export", [], out, out.parent)
        job.status, job.lines = "finished", ["no verify table here to scrape"]
        studio.jobs.jobs[job.id] = job
        r = export_result(studio, job.id)
    finally:
        studio.chat.close()
    m = Manifest.read(out)
    assert r["verify"] == m.verify and r["verify_ok"] is True and r["quality"] is None
    assert r["name"] == "tiny" and r["gguf"] == "tiny.gguf"
    assert r["modelfile"] == exported.modelfile.read_text(encoding="utf-8")
    assert r["ollama_create"] == f"ollama create tiny -f {exported.modelfile}"
