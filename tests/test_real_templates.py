"""The Modelfile TEMPLATE for real chat templates: derived, and Go ≡ HF, or refused in one line.

The templates are llama.cpp's ``models/templates/*.jinja`` from the llama-cpp-python sdist (the
real chat templates of Qwen2.5/3/3.5, Llama 3.1/3.2/3.3, Gemma 2, Phi-3.5, Mistral Nemo, SmolLM3,
the DeepSeek-R1 distills and more) and SmolLM2's from the real SmolLM2-135M-Instruct GGUF, all
fetched by mlx_lora/testing/assets.py. Every derived TEMPLATE is executed by Go's text/template as
Ollama
does (mlx_lora.ollama.go_runner) on the 24 check conversations under each think option (none, true,
false
↔ enable_thinking unset, true, false) and compared with transformers' rendering byte for byte; the
SmolLM2 one also token for token through llama.cpp with the GGUF's own add-BOS rule (issue 10).
"""

from __future__ import annotations

from collections import Counter

import pytest

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.prompt import render_template
from mlx_lora.ollama.go_runner import GoRenderer, go_missing
from mlx_lora.ollama.modelfile import render_modelfile
from mlx_lora.ollama.template import THINK_MODES, check_conversations, fold_system, go_template_for
from mlx_lora.testing.assets import chat_templates, smollm2_gguf

L3 = ("<|begin_of_text|>", "<|eot_id|>", True)
DS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True)
QWEN = (None, "<|im_end|>", False)
MISTRAL = ("<s>", "</s>", True)
# bos, eos and the GGUF's add_bos_token of the models these templates belong to
SPECIALS: dict[str, tuple[str | None, str | None, bool]] = {
    "Qwen-Qwen2.5-7B-Instruct": QWEN,
    "Qwen-Qwen3-0.6B": QWEN,
    "Qwen-QwQ-32B": QWEN,
    "Qwen3-Coder": QWEN,
    "Qwen3.5-4B": QWEN,
    "meta-llama-Llama-3.1-8B-Instruct": L3,
    "meta-llama-Llama-3.2-3B-Instruct": L3,
    "meta-llama-Llama-3.3-70B-Instruct": L3,
    "meetkai-functionary-medium-v3.1": L3,
    "meetkai-functionary-medium-v3.2": L3,
    "fireworks-ai-llama-3-firefunction-v2": L3,
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", True),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", True),
    "google-gemma-2-2b-it": ("<bos>", "<eos>", True),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", False),
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL,
    "unsloth-mistral-Devstral-Small-2507": MISTRAL,
    "mistralai-Ministral-3-14B-Reasoning-2512": MISTRAL,
    "HuggingFaceTB-SmolLM3-3B": (None, "<|im_end|>", False),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": DS,
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": DS,
    "llama-cpp-deepseek-r1": DS,
    "unsloth-Apriel-1.5": ("<s>", "<|end|>", False),
}

# name → (family, system placement, reacts to enable_thinking) when derived, or the refusal reason
T = True
F = False
EXPECTED: dict[str, tuple[str, str, bool] | str] = {
    # the families the brief names
    "Qwen-Qwen2.5-7B-Instruct": ("chatml", "turn", F),
    "Qwen-Qwen3-0.6B": ("chatml", "turn", T),
    "Qwen3.5-4B": ("chatml", "turn", T),
    "Qwen-QwQ-32B": ("chatml", "turn", T),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3", "turn", F),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3", "turn", F),
    "meta-llama-Llama-3.3-70B-Instruct": ("llama3", "turn", F),
    "google-gemma-2-2b-it": ("gemma", "first_user", F),
    "microsoft-Phi-3.5-mini-instruct": ("phi3", "turn", F),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", "last_user", F),
    "mistralai-Ministral-3-14B-Reasoning-2512": ("mistral", "turn", F),
    "HuggingFaceTB-SmolLM3-3B": ("chatml", "turn", T),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("deepseek", "turn", F),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("deepseek", "turn", T),
    "llama-cpp-deepseek-r1": ("deepseek", "turn", F),
    # the rest of llama.cpp's collection
    "Apertus-8B-Instruct": ("other", "turn", T),
    "Apriel-1.6-15b-Thinker-fixed": ("other", "turn", F),
    "Bielik-11B-v3.0-Instruct": ("chatml", "turn", T),
    "ByteDance-Seed-OSS": ("other", "turn", F),
    "Cohere2MoE": ("other", "turn", F),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("other", "turn", T),
    "GLM-4.6": ("other", "turn", T),
    "GLM-4.7-Flash": ("other", "turn", T),
    "GigaChat3-10B-A1.8B": ("other", "turn", F),
    "GigaChat3.1-10B-A1.8B": ("other", "turn", F),
    "Kimi-K2-Instruct": ("other", "turn", F),
    "Kimi-K2-Thinking": ("other", "turn", F),
    "Kimi-K3": ("other", "turn", F),
    "LFM2-8B-A1B": ("chatml", "turn", F),
    "LFM2.5-8B-A1B": ("chatml", "turn", F),
    "LFM2.5-Instruct": ("chatml", "turn", F),
    "MiMo-VL": ("chatml", "turn", F),
    "MiniMax-M1": ("other", "turn", F),
    "Mistral-Small-3.2-24B-Instruct-2506": ("mistral", "turn", F),
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ("chatml", "turn", T),
    "NVIDIA-Nemotron-Nano-v2": ("other", "turn", F),
    "Qwen3-Coder": ("chatml", "turn", F),
    "Reka-Edge": ("other", "turn", T),
    "Spark2.5": ("other", "turn", T),
    "StepFun3.5-Flash": ("chatml", "turn", F),
    "deepseek-ai-DeepSeek-V3.1": ("deepseek", "turn", T),
    "deepseek-ai-DeepSeek-V3.2": ("deepseek", "turn", T),
    "deepseek-ai-DeepSeek-V4-Flash-0731": ("deepseek", "turn", T),
    "deepseek-ai-DeepSeek-V4": ("deepseek", "turn", T),
    "google-gemma-4-31B-it-interleaved": ("other", "turn", T),
    "google-gemma-4-31B-it": ("other", "turn", T),
    "ibm-granite-granite-3.3-2B-Instruct": ("other", "turn", F),
    "ibm-granite-granite-4.0": ("other", "turn", F),
    "ibm-granite-granite-4.1": ("other", "turn", F),
    "inclusionai-ling-3.0-flash": ("other", "turn", T),
    "meetkai-functionary-medium-v3.1": ("llama3", "turn", F),
    "meetkai-functionary-medium-v3.2": ("llama3", "turn", F),
    "moonshotai-Kimi-K2": ("other", "turn", F),
    "muse-glimmer": ("other", "turn", F),
    "openai-gpt-oss-120b": ("other", "turn", F),
    "openbmb-MiniCPM5-1B": ("chatml", "turn", T),
    "poolside-Laguna-S-2.1": ("other", "turn", T),
    "poolside-Laguna-XS-2.1": ("other", "turn", T),
    "poolside-Laguna-XS.2": ("other", "turn", T),
    "tencent-Hy3": ("other", "turn", F),
    "unsloth-Apriel-1.5": ("phi3", "turn", F),
    "unsloth-mistral-Devstral-Small-2507": ("mistral", "turn", F),
    "upstage-Solar-Open-100B": ("other", "turn", F),
    # refused: the reason, as the one-line error says it
    "CohereForAI-c4ai-command-r-plus-tool_use": "rejected the conversation",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "rejected the conversation",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "rejected the conversation",
    "fireworks-ai-llama-3-firefunction-v2": "rejected the conversation",
    "MiniMax-M2": "no special token marks the end of an assistant turn",
    "MiniMax-M3": "no special token marks the end of an assistant turn",
    "llama-cpp-rwkv-world": "no special token marks the end of an assistant turn",
}

THINK = {"unset": None, "on": True, "off": False}
TRAIN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    return chat_templates()


@pytest.fixture(scope="module")
def go() -> GoRenderer:
    reason = go_missing()
    if reason:
        pytest.skip(reason)
    return GoRenderer()


def _cases(tpl: str, g, bos: str | None, eos: str | None) -> tuple[list[dict], list[str]]:
    """Go cases and the Jinja text each must give: the 24 check conversations under each think
    option, plus the no-system ones with the Modelfile SYSTEM Ollama would insert."""
    strip = len(g.leading_bos or "")
    cases, want = [], []

    def jinja(conv: list[dict], mode: str) -> str:
        ref = fold_system(conv) if g.system_placement == "first_user" else conv
        kw = THINK_MODES[mode]
        return render_template(tpl, ref, bos_token=bos, eos_token=eos, **kw)[strip:]

    for mode, think in THINK.items():
        for conv in check_conversations():
            cases.append({"template": g.template, "system": "", "messages": conv, "think": think})
            want.append(jinja(conv, mode))
    for conv in check_conversations():
        if conv[0]["role"] == "system":
            continue
        for system in {TRAIN_SYSTEM, g.default_system or TRAIN_SYSTEM}:
            with_sys = [{"role": "system", "content": system}, *conv]
            cases.append({"template": g.template, "system": system, "messages": conv})
            want.append(jinja(with_sys, "unset"))
    return cases, want


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_template_is_derived_and_matches_or_refused(
    go: GoRenderer, templates: dict[str, str], name: str
) -> None:
    if name not in templates:
        pytest.skip(f"{name}.jinja is not in this llama-cpp-python sdist")
    tpl = templates[name]
    bos, eos, add_bos = SPECIALS.get(name, (None, None, False))
    expected = EXPECTED[name]
    if isinstance(expected, str):
        with pytest.raises(MlxLoraError) as e:
            go_template_for(tpl, bos, eos, add_bos=add_bos)
        msg = str(e.value)
        assert expected in msg and msg.endswith("--template FILE") and "\n" not in msg
        return
    g = go_template_for(tpl, bos, eos, add_bos=add_bos)
    assert (g.family, g.system_placement, g.think) == expected
    cases, want = _cases(tpl, g, bos, eos)
    got = go.render(cases)
    same = sum(1 for w, r in zip(want, got, strict=True) if r["prompt"] == w and not r.get("error"))
    print(f"\n{name}: {g.family}, {g.system_placement}: Go ≡ HF on {same}/{len(cases)} prompts")
    for case, w, r in zip(cases, want, got, strict=True):
        assert not r.get("error"), r["error"]
        assert r["prompt"] == w, (case["think"] if "think" in case else "SYSTEM", case["messages"])
    assert len(cases) >= 3 * 24


def test_every_template_in_the_sdist_is_accounted_for(templates: dict[str, str]) -> None:
    assert set(templates) <= set(EXPECTED), sorted(set(templates) - set(EXPECTED))


def test_think_option_maps_to_enable_thinking(go: GoRenderer, templates: dict[str, str]) -> None:
    """Qwen3: no think option = the template's default (thinking), think=false = the empty think
    block enable_thinking=false writes; Ollama refuses think=true for a TEMPLATE without
    .Thinking, so it never reaches the template."""
    g = go_template_for(templates["Qwen-Qwen3-0.6B"], None, "<|im_end|>", add_bos=False)
    conv = [{"role": "user", "content": "Hi"}]
    outs = go.render(
        [{"template": g.template, "messages": conv, "think": t} for t in (None, False, True)]
    )
    assert outs[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert outs[1]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert outs[2]["prompt"] == outs[0]["prompt"]
    assert ".Thinking" not in g.template and g.default_system is None
    text = render_modelfile(from_path="./q.gguf", template=g)
    assert "# Ollama's think option" in text


def test_qwen3_strips_think_blocks_only_in_history(templates: dict[str, str]) -> None:
    """The HF template drops <think>…</think> from earlier assistant turns; the Go template passes
    contents through, so the history must reach it without think blocks: Ollama's own parser
    keeps them out of content for thinking models, and filterThinkTags strips them for the qwen3
    family. Shown here so the limit is a fact, not a surprise."""
    tpl = templates["Qwen-Qwen3-0.6B"]
    conv = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
    ]
    text = render_template(tpl, conv, eos_token="<|im_end|>")
    assert "<think>" not in text and "<|im_start|>assistant\n2<|im_end|>" in text


def test_llama32_date_is_currentdate(go: GoRenderer, templates: dict[str, str]) -> None:
    from datetime import datetime

    g = go_template_for(templates["meta-llama-Llama-3.2-3B-Instruct"], *L3[:2], add_bos=True)
    assert "currentDate" in g.template and "Jul 2024" not in g.template
    (out,) = go.render([{"template": g.template, "messages": [{"role": "user", "content": "x"}]}])
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in out["prompt"]
    g31 = go_template_for(templates["meta-llama-Llama-3.1-8B-Instruct"], *L3[:2], add_bos=True)
    assert "26 Jul 2024" in g31.template  # 3.1 writes a fixed date


def test_default_system_prompts(templates: dict[str, str]) -> None:
    qwen25 = go_template_for(templates["Qwen-Qwen2.5-7B-Instruct"], *QWEN[:2], add_bos=False)
    assert qwen25.default_system == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    smol3 = go_template_for(templates["HuggingFaceTB-SmolLM3-3B"], None, "<|im_end|>", add_bos=F)
    assert smol3.default_system is None  # it depends on the think mode: the template injects it
    assert "You are a helpful AI assistant named SmolLM" in smol3.template


def test_summary_table(templates: dict[str, str]) -> None:
    """Per family: derived/total (printed with -s; the report quotes it)."""
    rows: Counter[str] = Counter()
    derived: Counter[str] = Counter()
    for name, expected in EXPECTED.items():
        if name not in templates:
            continue
        family = expected[0] if isinstance(expected, tuple) else "refused"
        rows[family] += 1
        derived[family] += isinstance(expected, tuple)
    print("\n" + "\n".join(f"{f:9s} {derived[f]}/{rows[f]}" for f in sorted(rows)))
    assert sum(derived.values()) >= 60


# ---------------------------------------------------------------------------------------------
# SmolLM2 (issue 10): the BOS text the template starts with is the TEMPLATE's to write


def _smollm2() -> tuple[str, object, bool]:
    import gguf

    path = smollm2_gguf()
    reader = gguf.GGUFReader(path)
    tpl = reader.fields["tokenizer.chat_template"].contents()
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
    return tpl, path, add_bos


def test_smollm2_template_keeps_its_leading_bos(go: GoRenderer) -> None:
    tpl, _, add_bos = _smollm2()
    assert add_bos is False
    g = go_template_for(tpl, "<|im_start|>", "<|im_end|>", add_bos=add_bos)
    assert g.leading_bos is None and g.starts_with_bos and g.family == "chatml"
    assert (
        g.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    cases, want = _cases(tpl, g, "<|im_start|>", "<|im_end|>")
    got = go.render(cases)
    assert [r["prompt"] for r in got] == want and len(want) >= 24
    assert all(w.startswith("<|im_start|>system\n") for w in want)
    text = render_modelfile(from_path="./s.gguf", template=g)
    assert "TEMPLATE writes the prompt's leading <|im_start|> itself" in text
    assert "added by Ollama" not in text


def test_smollm2_token_ids_through_llama_cpp(go: GoRenderer) -> None:
    """Token level, as issue 10 asks: the Go text tokenized the way llama-server will (GGUF's own
    add-BOS rule) equals the Jinja text tokenized as apply_chat_template(tokenize=True) does (no
    specials added); the old rule (strip the BOS, leave it to the runtime) fails every time."""
    pytest.importorskip("llama_cpp")
    from mlx_lora.gguf.llamacpp import llama_tokenize, open_llama

    tpl, path, add_bos = _smollm2()
    llm = open_llama(path, vocab_only=True)
    good = go_template_for(tpl, "<|im_start|>", "<|im_end|>", add_bos=add_bos)
    old = go_template_for(tpl, "<|im_start|>", "<|im_end|>", add_bos=True)  # the issue-10 bug
    convs = check_conversations()
    ok_good = ok_old = 0
    for g in (good, old):
        outs = go.render([{"template": g.template, "messages": c} for c in convs])
        for conv, out in zip(convs, outs, strict=True):
            want = llama_tokenize(llm, render_template(tpl, conv, bos_token="<|im_start|>"))
            got = llama_tokenize(llm, out["prompt"], add_special=True)
            if g is good:
                ok_good += got == want
            else:
                ok_old += got == want
    assert want[0] == 1  # <|im_start|>, SmolLM2's BOS id
    assert (ok_good, ok_old) == (len(convs), 0)


def test_which_templates_ollama_bypasses(templates: dict[str, str]) -> None:
    """Ollama >= 0.30 prefers the GGUF's chat template when it declares tools or thinking (our
    TEMPLATEs declare neither); the Modelfile says so."""
    qwen = go_template_for(templates["Qwen-Qwen3-0.6B"], None, "<|im_end|>", add_bos=False)
    gemma = go_template_for(templates["google-gemma-2-2b-it"], "<bos>", "<eos>", add_bos=True)
    phi = go_template_for(
        templates["microsoft-Phi-3.5-mini-instruct"], "<s>", "<|endoftext|>", add_bos=False
    )
    assert qwen.ollama_prefers_gguf and not gemma.ollama_prefers_gguf
    assert not phi.ollama_prefers_gguf
    assert "OLLAMA_GO_TEMPLATE=1" in render_modelfile(from_path="./q.gguf", template=qwen)
    assert "OLLAMA_GO_TEMPLATE" not in render_modelfile(from_path="./g.gguf", template=gemma)
