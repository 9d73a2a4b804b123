"""One way to turn messages into token ids, shared by training, chat, serve and verify.

Garbled answers in the seed came from prompts built by hand or with another model's template.
Here every caller goes through :func:`render` (the tokenizer's own chat template) and
:func:`encode_text` (one tokenization of the whole rendered text), so the prompt a user chats with
is token for token the prefix the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lora.errors import MlxLoraError

Message = dict[str, str]


def hf_tokenizer(tokenizer: Any) -> Any:
    """mlx-lm wraps the Hugging Face tokenizer; the template and offsets live on the inner one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(hf_tokenizer(tokenizer), "chat_template", None))


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """Put ``system_prompt`` first unless the conversation brings its own system turn."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; template errors become one-line user errors."""
    tok = hf_tokenizer(tokenizer)
    if not getattr(tok, "chat_template", None):
        raise MlxLoraError(
            "the tokenizer has no chat template, so conversations cannot be rendered; "
            "use --format text or completions, or a chat model"
        )
    try:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raise_exception(), e.g. "system role not supported"
        raise MlxLoraError(f"the model's chat template rejected the conversation: {e}") from None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-rendered text (the template supplies any BOS itself)."""
    return list(hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


def build_prompt(
    tokenizer: Any, messages: list[Message], system_prompt: str | None = None
) -> list[int]:
    """Prompt ids for the next assistant answer: what chat, serve and verify feed the model."""
    text = render(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True)
    return encode_text(tokenizer, text)


def _special_strings(tok: Any) -> list[str]:
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content if hasattr(added, "content") else added))
    return sorted((s for s in specials if s), key=len, reverse=True)


def end_of_turn(tokenizer: Any) -> str:
    """The token the template closes an assistant turn with (``<|im_end|>`` for ChatML).

    Found by rendering a probe conversation and taking the first special token after the
    assistant's text, so it follows the template rather than the model's name.
    """
    tok = hf_tokenizer(tokenizer)
    mark, after = "PROBE_ANSWER_7f3a", "PROBE_NEXT_7f3a"
    probe = [
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": mark},
        {"role": "user", "content": after},
    ]
    text = render(tok, probe, add_generation_prompt=False)
    start = text.find(mark) + len(mark)
    stop = text.find(after, start)
    tail = text[start : stop if stop >= 0 else None]
    found = [(tail.find(s), s) for s in _special_strings(tok) if s in tail]
    if found:
        return min(found)[1]
    eos = getattr(tok, "eos_token", None)
    if not eos:
        raise MlxLoraError(
            "cannot tell how the chat template ends an assistant turn and the tokenizer has no "
            "eos token"
        )
    return eos


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and, per token, whether the loss is computed on it."""

    ids: list[int]
    mask: list[bool]


def encode_conversation(
    tokenizer: Any,
    messages: list[Message],
    system_prompt: str | None = None,
    eot: str | None = None,
) -> Encoded:
    """Ids of a whole conversation and a mask over every assistant turn plus its end-of-turn token.

    The text is the template's rendering of the whole conversation, tokenized once (exactly what
    :func:`build_prompt` produces for each prefix). A template that leaves the last assistant turn
    open (Qwen1.5 does, for prefill) gets the end-of-turn token appended: a model that never sees
    it never learns to stop.
    """
    tok = hf_tokenizer(tokenizer)
    eot = eot or end_of_turn(tok)
    msgs = with_system(messages, system_prompt)
    text = render(tok, msgs, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, msgs[:i], add_generation_prompt=True)
        if text.startswith(prefix):
            cursor = max(cursor, len(prefix))
        content = m["content"]
        start = text.find(content, cursor)
        if start < 0:  # templates that trim the content (Llama-3 does)
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise MlxLoraError(
                "the chat template does not reproduce an assistant turn verbatim; use --format text"
            )
        end = start + len(content)
        gap = text[end:]
        eot_at = gap.find(eot)
        if eot_at >= 0 and not gap[:eot_at].strip():
            end += eot_at + len(eot)
        elif not gap.strip():
            text += eot
            end = len(text)
        else:
            raise MlxLoraError(
                f"the chat template does not close assistant turns with {eot!r}; use --format text"
            )
        spans.append((start, end))
        cursor = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    return Encoded(ids, mask)
