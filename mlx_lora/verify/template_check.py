"""Verify's Modelfile check: the token ids Ollama feeds llama.cpp are the chat template's own.

Issue 10's SmolLM2 Modelfile looked right and was wrong for every conversation: its TEMPLATE left
the leading ``<|im_start|>`` to a BOS that the GGUF (``add_bos_token = false``) never adds. Only the
whole path shows such errors, so it is run here as Ollama runs it: the Modelfile is read with
Ollama's parser rules, its TEMPLATE executed by Go's ``text/template`` with Ollama's SYSTEM
handling (:mod:`mlx_lora.ollama.go_runner`), the text tokenized by llama.cpp from the GGUF the way
llama-server tokenizes a prompt (special tokens parsed, BOS/EOS as the GGUF says; Ollama's own
strip of a literal ``<bos>``), and the ids compared with ``apply_chat_template(tokenize=True)``
(:func:`mlx_lora.model.prompt.build_prompt`) on every check conversation. A model without a chat
template
is checked on plain texts: ``{{ .Prompt }}`` against the tokenizer's own ids for the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.gguf.llamacpp import llama_tokenize, open_llama
from mlx_lora.model.prompt import build_prompt, has_chat_template, hf_tokenizer, with_system
from mlx_lora.ollama.go_runner import GoRenderer, go_missing, modelfile_commands
from mlx_lora.ollama.template import check_conversations, fold_system


@dataclass
class PromptCheck:
    """How many prompts agree; ``unit`` is "conversations" or "texts"; ``skipped`` is a reason."""

    identical: int = 0
    total: int = 0
    unit: str = "conversations"
    example: str | None = None  # the first disagreement, shortened
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.identical == self.total


def hf_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], system: str | None) -> list[int]:
    """``apply_chat_template(tokenize=True)`` of ``messages`` with the Modelfile SYSTEM applied as
    Ollama applies it; a template without a system role gets the system text in the first user
    message (what the derived TEMPLATE does)."""
    msgs = with_system(messages, system)
    try:
        return build_prompt(tokenizer, msgs)
    except MlxLoraError:
        if msgs and msgs[0]["role"] == "system":
            return build_prompt(tokenizer, fold_system(msgs))
        raise


def _ollama_ids(llm: Any, prompt: str, adds_bos: bool) -> list[int]:
    """What llama-server gets from Ollama for ``prompt``: Ollama strips a literal ``<bos>`` when it
    believes the tokenizer adds BOS, then llama.cpp tokenizes with add_special and parse_special."""
    if adds_bos and prompt.startswith("<bos>"):
        prompt = prompt[len("<bos>") :]
    return llama_tokenize(llm, prompt, add_special=True)


def _ollama_adds_bos(gguf_path: Path) -> bool:
    """Ollama's ``tokenizerAddsBOS``: lfm2/gemma4 always, else the GGUF's add_bos_token key."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    if "gemma4" in (value("tokenizer.ggml.pre"), value("tokenizer.ggml.model")):
        return True
    if value("tokenizer.ggml.pre") == "lfm2":
        return True
    return bool(value("tokenizer.ggml.add_bos_token"))


def check_modelfile_prompts(
    modelfile: Path, gguf_path: Path, tokenizer: Any, plain_texts: Sequence[str]
) -> PromptCheck:
    """Ollama's prompt ids for the Modelfile's TEMPLATE and SYSTEM against the HF tokenizer's."""
    reason = go_missing()
    if reason:
        return PromptCheck(skipped=reason)
    go = GoRenderer()
    cmds = modelfile_commands(go.parse([Path(modelfile).read_text(encoding="utf-8")])[0])
    if not cmds.get("template"):
        return PromptCheck(skipped="the Modelfile has no TEMPLATE (Ollama would pick its own)")
    template, system = cmds["template"][-1], (cmds.get("system") or [""])[-1]
    tok = hf_tokenizer(tokenizer)
    if has_chat_template(tok):
        convs = check_conversations()
        cases = [{"template": template, "system": system, "messages": c} for c in convs]
        want = [hf_prompt_ids(tok, c, system or None) for c in convs]
        unit = "conversations"
    else:
        msgs = [[{"role": "user", "content": t}] for t in plain_texts]
        cases = [{"template": template, "system": system, "messages": m} for m in msgs]
        want = [list(tok(t)["input_ids"]) for t in plain_texts]
        unit = "texts"
    rendered = go.render(cases)
    adds_bos = _ollama_adds_bos(Path(gguf_path))
    llm = open_llama(Path(gguf_path), vocab_only=True)
    result = PromptCheck(total=len(cases), unit=unit)
    for case, w, r in zip(cases, want, rendered, strict=True):
        got = [] if r.get("error") else _ollama_ids(llm, r["prompt"], adds_bos)
        if got == w and not r.get("error"):
            result.identical += 1
        elif result.example is None:
            first = case["messages"][-1]["content"][:24]
            detail = r.get("error") or f"Ollama {got[:6]}… HF {w[:6]}…"
            result.example = f"{len(case['messages'])} messages ending {first!r}: {detail}"
    del llm
    return result
