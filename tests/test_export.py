"""Export end to end: the GGUF llama.cpp serves is the model MLX chats with, and the Modelfile says
so.

Models: a tiny Qwen2 model carrying the real Qwen1.5 tokenizer (151,936 tokens) with a random
nonzero adapter, and the really trained stories260K (Llama architecture, SentencePiece) with a
random nonzero adapter on q,k,v,o: its logits have clear winners, so q8_0 must keep every top-1.
llama.cpp runs through llama-cpp-python (extra ``verify``); those tests skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, STORIES, Harness, _commands, need

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.export.pipeline import ExportConfig, export
from mlx_lora.gguf.llamacpp import open_llama
from mlx_lora.testing.adapter import random_adapter
from mlx_lora.verify.checks import (
    TEXTS,
    load_mlx,
    mlx_greedy,
    mlx_logits,
    probe_prompts,
    verify_export,
    verify_gguf,
)

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
SYSTEM = "你是甄嬛，家父是大理寺少卿甄远道。"
STORY_TEMPLATE = "{{- range .Messages }}{{ .Content }}{{ end }}"


def _export(log: bool = False, **kw) -> object:
    return export(ExportConfig(**kw), progress=False, log=log)


def _llama_logits(
    gguf: Path, prompts: list[list[int]], lora: Path | None = None
) -> list[np.ndarray]:
    from mlx_lora.gguf.llamacpp import llama_logits

    llm = open_llama(gguf, n_ctx=256, lora_path=lora)
    return [llama_logits(llm, p) for p in prompts]


def _mlx(model_dir: Path, adapter: Path | None, prompts: list[list[int]]) -> list[np.ndarray]:
    model, _ = load_mlx(model_dir, adapter)
    return [mlx_logits(model, p) for p in prompts]


def _max_delta(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------- fixtures (built once per module)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def qwen_adapter(tiny_qwen, work) -> Path:
    return random_adapter(tiny_qwen, work / "adapter-qwen", system_prompt=SYSTEM, seed=5)


@pytest.fixture(scope="module")
def stories() -> Path:
    return need(STORIES)


@pytest.fixture(scope="module")
def stories_adapter(stories, work) -> Path:
    return random_adapter(
        stories,
        work / "adapter-stories",
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        scale=0.05,
        seed=6,
    )


@pytest.fixture(scope="module")
def story_template(work) -> Path:
    path = work / "story.tmpl"
    path.write_text(STORY_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def qwen_f32(tiny_qwen, qwen_adapter, work):
    """Full mode, f32, verified: fused folder, GGUF, Modelfile and the verify report."""
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama-cpp-python not installed")
    return _export(
        adapter=str(qwen_adapter),
        output_dir=str(work / "qwen-f32"),
        gguf_type="f32",
        name="huanhuan",
        num_ctx=2048,
        verify=True,
    )


@pytest.fixture(scope="module")
def qwen_prompts(qwen_f32):
    from transformers import AutoTokenizer

    return probe_prompts(AutoTokenizer.from_pretrained(str(qwen_f32.hf_dir)), SYSTEM)


@pytest.fixture(scope="module")
def stories_f32(stories, stories_adapter, story_template, work):
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama-cpp-python not installed")
    return _export(
        model=str(stories),
        adapter=str(stories_adapter),
        output_dir=str(work / "stories-f32"),
        gguf_type="f32",
        template=str(story_template),
        verify=True,
    )


# ------------------------------------------------------------------ full mode, f32: identical model


@needs_llama_cpp
def test_qwen_f32_tokenization_logits_and_greedy_identical(qwen_f32):
    r = qwen_f32.report
    print("\n" + r.table())
    assert r.ok
    tok = r.get("tokenization").values
    assert tok["identical"] == tok["total"] == len(TEXTS)
    logits = r.get("logits llama.cpp vs MLX").values
    assert logits["max_abs"] <= 1e-4 and logits["top1_equal"] == logits["positions"]
    greedy = r.get("greedy").values
    assert len(greedy["mlx"]) == 32 and greedy["llama_cpp"] == greedy["mlx"]
    fused = r.get("fused (float32) vs base+adapter").values
    assert fused["max_abs"] <= 1e-4
    if r.get("Modelfile template").status != "skipped":  # needs go on PATH
        mf = r.get("Modelfile template").values
        assert mf["identical"] == mf["total"] == 24 and mf["unit"] == "conversations"


@needs_llama_cpp
def test_qwen_gguf_matches_mlx_base_plus_adapter_directly(qwen_f32, qwen_adapter, qwen_prompts):
    """Independently of verify.py's bookkeeping: llama.cpp(fused GGUF) vs MLX(base + PEFT
    adapter)."""
    ref = _mlx(qwen_f32.base_dir, qwen_adapter, qwen_prompts)
    got = _llama_logits(qwen_f32.gguf, qwen_prompts)
    delta = _max_delta(ref, got)
    print(f"\n[qwen f32] llama.cpp fused GGUF vs MLX base+adapter: max|Δlogit| {delta:.2e}")
    assert delta <= 1e-4
    model, _ = load_mlx(qwen_f32.base_dir, qwen_adapter)
    ours = mlx_greedy(model, qwen_prompts[1], 32)
    llm = open_llama(qwen_f32.gguf, n_ctx=256)
    from mlx_lora.gguf.llamacpp import llama_greedy

    assert llama_greedy(llm, qwen_prompts[1], 32) == ours


@needs_llama_cpp
def test_qwen_f16_within_1e_2(tiny_qwen, qwen_adapter, qwen_prompts, work):
    r = _export(
        adapter=str(qwen_adapter), output_dir=str(work / "qwen-f16"), gguf_type="f16", name="hh16"
    )
    ref = _mlx(tiny_qwen, qwen_adapter, qwen_prompts)
    delta = _max_delta(ref, _llama_logits(r.gguf, qwen_prompts))
    print(f"\n[qwen f16] llama.cpp vs MLX base+adapter fp32: max|Δlogit| {delta:.2e}")
    assert delta <= 1e-2
    assert (
        json.loads((r.fused_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    )  # the base's own


@needs_llama_cpp
def test_qwen_adapter_mode_equals_fused_model(qwen_f32, qwen_adapter, qwen_prompts, work):
    r = _export(
        adapter=str(qwen_adapter),
        output_dir=str(work / "qwen-adapter"),
        gguf_type="f32",
        name="huanhuan",
        mode="adapter",
    )
    assert (
        r.fused_dir is None
        and r.lora_gguf.name == "huanhuan-lora.gguf"
        and r.gguf.name == "huanhuan-base.gguf"
    )
    got = _llama_logits(r.gguf, qwen_prompts, lora=r.lora_gguf)
    fused = _mlx(qwen_f32.fused_dir, None, qwen_prompts)  # our fused model
    delta = _max_delta(got, fused)
    print(f"\n[qwen adapter mode] llama.cpp base+LoRA GGUF vs MLX fused: max|Δlogit| {delta:.2e}")
    assert delta <= 1e-3
    assert (
        _max_delta(_llama_logits(r.gguf, qwen_prompts), fused) > 1e-2
    )  # without the LoRA it differs


# ----------------------------------------------------------------- Llama architecture (stories260K)


@needs_llama_cpp
def test_stories_f32_identical(stories_f32):
    r = stories_f32.report
    print("\n" + r.table())
    assert r.ok
    assert r.get("GGUF read back").values["architecture"] == "llama"
    tok = r.get("tokenization").values
    assert tok["identical"] == tok["total"]
    logits = r.get("logits llama.cpp vs MLX").values
    assert logits["max_abs"] <= 1e-4 and logits["top1_equal"] == logits["positions"]
    assert r.get("greedy").values["llama_cpp"] == r.get("greedy").values["mlx"]
    assert r.get("fused (float32) vs base+adapter").values["max_abs"] <= 1e-4


@needs_llama_cpp
def test_stories_q8_0_keeps_top1(stories, stories_adapter, story_template, work):
    r = _export(
        model=str(stories),
        adapter=str(stories_adapter),
        output_dir=str(work / "stories-q8"),
        gguf_type="q8_0",
        template=str(story_template),
        verify=True,
    )
    v = r.report.get("logits llama.cpp vs MLX").values
    print(
        f"\n[stories q8_0] max|Δlogit| {v['max_abs']:.3g}, top-1 {v['top1_equal']}/{v['positions']}"
    )
    assert r.report.ok
    assert v["top1_equal"] == v["positions"]


@needs_llama_cpp
def test_stories_adapter_mode_equals_fused_model(
    stories_f32, stories, stories_adapter, story_template, work
):
    r = _export(
        model=str(stories),
        adapter=str(stories_adapter),
        output_dir=str(work / "stories-adapter"),
        gguf_type="f32",
        template=str(story_template),
        mode="adapter",
        verify=True,
    )
    assert r.report.ok, r.report.table()
    assert r.report.get("GGUF LoRA adapter").status == "ok"
    prompts = r.report.get("llama.cpp base+LoRA").values
    assert prompts["max_abs"] <= 1e-3
    from transformers import AutoTokenizer

    ids = probe_prompts(AutoTokenizer.from_pretrained(str(stories)))
    delta = _max_delta(
        _llama_logits(r.gguf, ids, lora=r.lora_gguf), _mlx(stories_f32.fused_dir, None, ids)
    )
    print(
        f"\n[stories adapter mode] llama.cpp base+LoRA GGUF vs MLX fused: max|Δlogit| {delta:.2e}"
    )
    assert delta <= 1e-3


# ------------------------------------------------------------------ Modelfile


def _parse_modelfile(harness: Harness, path: Path) -> dict[str, list[str]]:
    return _commands(harness.parse([path.read_text(encoding="utf-8")])[0])


@needs_llama_cpp
def test_modelfile_full_mode(qwen_f32, go):  # noqa: F811 - the imported fixture
    from mlx_lora.model.prompt import render, with_system
    from mlx_lora.ollama.modelfile import go_template_for_tokenizer

    cmds = _parse_modelfile(go, qwen_f32.modelfile)
    _, tok = load_mlx(qwen_f32.hf_dir)
    assert cmds["model"] == ["./huanhuan.gguf"]
    assert "adapter" not in cmds
    assert cmds["template"] == [go_template_for_tokenizer(tok).template]
    assert cmds["system"] == [SYSTEM]  # the training system prompt, not Qwen's default
    assert cmds["stop"] == ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    assert cmds["num_ctx"] == ["2048"]
    gen = json.loads((qwen_f32.hf_dir / "generation_config.json").read_text())
    assert cmds["temperature"] == [repr(float(gen["temperature"]))] and cmds["top_k"] == [
        str(gen["top_k"])
    ]
    # What Ollama sends for a request without a system message = what MLX built in training and
    # chat.
    msgs = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "皇上万福。"},
        {"role": "user", "content": "今天天气如何？"},
    ]
    rendered = go.render(
        [{"template": cmds["template"][0], "system": cmds["system"][0], "messages": msgs}]
    )[0]
    assert not rendered.get("error"), rendered
    assert rendered["prompt"] == render(tok, with_system(msgs, SYSTEM), add_generation_prompt=True)
    manifest = json.loads(qwen_f32.manifest.read_text())
    assert (
        manifest["gguf"] == "huanhuan.gguf"
        and manifest["hf_dir"] == "huanhuan-hf"
        and manifest["mode"] == "full"
    )


def test_modelfile_adapter_mode_template_file_and_system_override(
    stories,
    stories_adapter,
    story_template,
    work,
    go,  # noqa: F811 - the session fixture imported above
):
    r = _export(
        model=str(stories),
        adapter=str(stories_adapter),
        output_dir=str(work / "stories-mf"),
        gguf_type="f16",
        template=str(story_template),
        mode="adapter",
        name="story",
        system_prompt='Tell a "short" story.\nBe kind.',
        num_ctx=512,
    )
    cmds = _parse_modelfile(go, r.modelfile)
    assert cmds["model"] == ["./story-base.gguf"]
    assert cmds["adapter"] == ["./story-lora.gguf"]
    assert cmds["template"] == [STORY_TEMPLATE]
    assert cmds["system"] == ['Tell a "short" story.\nBe kind.']
    assert cmds["stop"] == ["</s>"]
    assert cmds["num_ctx"] == ["512"]
    assert sorted(p.name for p in r.output_dir.iterdir()) == [
        "Modelfile",
        "export.json",
        "story-base.gguf",
        "story-lora.gguf",
    ]


def test_no_adapter_converts_model_as_is(stories, tiny_model, work):
    r = _export(model=str(tiny_model), output_dir=str(work / "plain"), gguf_type="f16")
    assert r.gguf.name == "tiny.gguf" and r.fused_dir is None and r.hf_dir == tiny_model.resolve()
    text = r.modelfile.read_text()
    assert 'SYSTEM "You are a helpful assistant"' in text  # the template's own default
    with pytest.raises(MlxLoraError, match="already exists.*--overwrite"):
        _export(model=str(tiny_model), output_dir=str(work / "plain"), gguf_type="f16")
    with pytest.raises(MlxLoraError, match="--mode adapter needs --adapter"):
        _export(model=str(stories), output_dir=str(work / "x"), mode="adapter")


@pytest.mark.parametrize("mode", ["full", "adapter"])
def test_base_model_without_chat_template_gets_raw_prompt_template(
    stories,
    stories_adapter,
    work,
    mode,
    capsys,
    go,  # noqa: F811 - the session fixture imported above
):
    """Issue 11.5: stories260K (no chat template) exports with no --template: TEMPLATE is
    {{ .Prompt }}, said in one line, and Ollama sends a request's text unchanged."""
    out = work / f"raw-{mode}"
    kw = {"adapter": str(stories_adapter), "mode": mode} if mode == "adapter" else {}
    r = _export(model=str(stories), output_dir=str(out), gguf_type="f16", log=True, **kw)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "{{ .Prompt }}" in ln]
    assert lines == [
        "no chat template (a base model): Modelfile TEMPLATE is the raw prompt {{ .Prompt }}"
    ]
    cmds = _parse_modelfile(go, r.modelfile)
    assert cmds["template"] == ["{{ .Prompt }}"] and cmds["stop"] == ["</s>"]
    assert ("adapter" in cmds) == (mode == "adapter")
    (out_prompt,) = go.render(
        [{"template": cmds["template"][0], "messages": [{"role": "user", "content": "Once upon"}]}]
    )
    assert out_prompt["prompt"] == "Once upon"


@pytest.fixture(scope="module")
def smol_like(work) -> Path:
    """A tiny llama with SmolLM2's situation (issue 10): BOS is <|im_start|>, the tokenizer does
    not add it, and the chat template (SmolLM2's own, from its GGUF) starts with it."""
    import gguf
    from conftest import make_tiny_model

    from mlx_lora.testing.assets import smollm2_gguf

    model = make_tiny_model(work / "smol-like", arch="llama")
    reader = gguf.GGUFReader(smollm2_gguf())
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = reader.fields["tokenizer.chat_template"].contents()
    cfg["bos_token"] = "<|im_start|>"
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return model


@needs_llama_cpp
def test_verify_catches_a_template_that_leaves_bos_to_the_runtime(
    smol_like,
    work,
    go,  # noqa: F811 - the session fixture imported above
):
    """Issue 10 end to end: the GGUF says add_bos_token = false, so the TEMPLATE keeps the leading
    <|im_start|> and Ollama's prompt ids (Go + llama.cpp) equal apply_chat_template's on all 24
    conversations; the TEMPLATE of the old rule (BOS stripped) fails all of them."""
    import gguf

    from mlx_lora.model.prompt import load_hf_tokenizer
    from mlx_lora.ollama.modelfile import go_template_for_tokenizer, render_modelfile

    r = _export(model=str(smol_like), output_dir=str(work / "smol-out"), gguf_type="f32")
    reader = gguf.GGUFReader(r.gguf)
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    text = r.modelfile.read_text(encoding="utf-8")
    assert "TEMPLATE writes the prompt's leading <|im_start|> itself" in text
    report = verify_gguf(r.hf_dir, r.gguf, modelfile=r.modelfile, greedy_tokens=0)
    check = report.get("Modelfile template vs HF template")
    assert (check.status, check.figures) == ("ok", "24/24 conversations identical")

    old = go_template_for_tokenizer(load_hf_tokenizer(smol_like), add_bos=True)
    assert old.leading_bos == "<|im_start|>"  # what the Modelfile used to say Ollama adds
    bad = work / "smol-out" / "Modelfile.old"
    bad.write_text(render_modelfile(from_path=f"./{r.gguf.name}", template=old), encoding="utf-8")
    report = verify_gguf(r.hf_dir, r.gguf, modelfile=bad, greedy_tokens=0)
    check = report.get("Modelfile template vs HF template")
    assert check.status == "FAIL" and check.values["identical"] == 0 and not report.ok
    assert check.figures.startswith("0/24 conversations identical; e.g.")


@needs_llama_cpp
def test_modelfile_check_skips_without_go(smol_like, work, monkeypatch):
    r = _export(model=str(smol_like), output_dir=str(work / "smol-nogo"), gguf_type="f32")
    monkeypatch.setenv("PATH", str(work / "empty-path"))
    report = verify_gguf(r.hf_dir, r.gguf, modelfile=r.modelfile, greedy_tokens=0)
    check = report.get("Modelfile template vs HF template")
    assert check.status == "skipped" and "`go` is not on PATH" in check.figures and report.ok


def test_verify_without_llama_cpp_runs_the_rest(
    stories_adapter, stories, story_template, work, monkeypatch, capsys
):
    import mlx_lora.verify.checks as v

    r = _export(
        model=str(stories),
        adapter=str(stories_adapter),
        output_dir=str(work / "stories-nollama"),
        gguf_type="f32",
        template=str(story_template),
    )
    monkeypatch.setattr(v, "have_llama_cpp", lambda: False)
    report = verify_export(r.output_dir)
    assert report.ok
    assert report.get("GGUF read back").status == "ok"
    assert report.get("fused (float32) vs base+adapter").status == "ok"
    assert report.get("tokenization").status == "skipped"
    assert report.get("Modelfile template").status == "skipped"
    assert report.get("logits").status == "skipped"
    assert 'pip install "mlx_lora[verify]"' in report.table()


# -------------------------------------------------------------- CLI: --verify, and a corrupted GGUF


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli_export(tiny_model, work) -> tuple[subprocess.CompletedProcess, Path]:
    adapter = random_adapter(tiny_model, work / "adapter-tiny", system_prompt=SYSTEM, seed=9)
    out = work / "cli"
    return _cli(
        "mlx_lora.export",
        "--adapter",
        str(adapter),
        "--output-dir",
        str(out),
        "--gguf-type",
        "f32",
        "--verify",
    ), out


@needs_llama_cpp
def test_cli_verify_exits_0_and_prints_figures(cli_export):
    proc, out = cli_export
    assert proc.returncode == 0, proc.stderr
    assert "max|Δlogit|" in proc.stdout and "all checks passed" in proc.stdout
    assert "ollama run adapter-tiny" in proc.stdout
    for name in ("adapter-tiny.gguf", "Modelfile", "export.json", "adapter-tiny-hf"):
        assert (out / name).exists() and str(out / name) in proc.stdout


@needs_llama_cpp
def test_corrupted_gguf_makes_verify_exit_1(cli_export, work):
    import gguf

    proc, out = cli_export
    assert proc.returncode == 0, proc.stderr
    bad = work / "cli-corrupted"
    shutil.copytree(out, bad)
    path = bad / "adapter-tiny.gguf"
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    start, n = int(t.data_offset), int(t.n_bytes)
    del reader
    data = bytearray(path.read_bytes())
    data[start : start + n] = bytes(
        b ^ 0x80 if i % 4 == 3 else b for i, b in enumerate(data[start : start + n])
    )  # f32 signs
    path.write_bytes(bytes(data))
    v = _cli("mlx_lora.verify", "--export-dir", str(bad))
    assert v.returncode == 1, v.stdout + v.stderr
    assert "FAIL" in v.stdout and "MISMATCH" in v.stdout
    assert _cli("mlx_lora.verify", "--export-dir", str(out)).returncode == 0


def test_verify_refuses_missing_files(work):
    with pytest.raises(MlxLoraError, match="does not exist"):
        verify_gguf(work / "nope", work / "nope.gguf")
    with pytest.raises(MlxLoraError, match="export.json"):
        verify_export(work)


# ------------------------------------------------------------------ ollama create


def test_ollama_create_runs_ollama_or_says_how(
    stories, story_template, work, monkeypatch, tmp_path
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(
        MlxLoraError, match="`ollama` is not on PATH.*ollama create story -f .*Modelfile"
    ):
        _export(
            model=str(stories),
            output_dir=str(work / "ollama-missing"),
            gguf_type="f16",
            template=str(story_template),
            name="story",
            ollama_create=True,
        )
    assert (work / "ollama-missing" / "story.gguf").is_file()  # the export itself is complete

    record = tmp_path / "args.json"
    fake = bin_dir / "ollama"  # records how it was called, like `ollama create` would be
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    r = _export(
        model=str(stories),
        output_dir=str(work / "ollama-fake"),
        gguf_type="f16",
        template=str(story_template),
        name="story",
        ollama_quantize="q4_K_M",
    )
    assert r.ollama_created
    called = json.loads(record.read_text())
    assert called["argv"] == ["create", "story", "-f", str(r.modelfile), "-q", "q4_K_M"]
    assert called["cwd"] == str(r.output_dir)  # FROM ./story.gguf resolves next to the Modelfile
    with pytest.raises(MlxLoraError, match="--ollama-quantize needs an unquantized GGUF"):
        _export(
            model=str(stories),
            output_dir=str(work / "ollama-q8"),
            gguf_type="q8_0",
            ollama_quantize="q4_K_M",
        )
