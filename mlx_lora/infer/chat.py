"""``python -m mlx_lora.chat``: talk to a base model + adapter (or a fused folder).

One answer with ``--prompt``, a conversation otherwise. Every turn goes through
:func:`mlx_lora.infer.generate.generate_answer`, the same function serve and the studio use, so
what you
read here is what Dify gets.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mlx_lora.config import ChatConfig, parse_config
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.infer.generate import (
    AnswerStream,
    PromptCache,
    check_max_tokens,
    generate_answer,
    require_chat_template,
    resolve_sampling,
)
from mlx_lora.model.load import load_for_inference
from mlx_lora.model.lora import read_adapter
from mlx_lora.model.prompt import Message

HELP = """\
interactive commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    use TEXT as the system prompt and start over (/system alone: back to the default)
  /quit           leave (Ctrl-D too); Ctrl-C stops the current answer
"""


class Conversation:
    """The interactive session's state: history, system prompt and the reused KV cache."""

    def __init__(self, loaded: Any, cfg: ChatConfig):
        self.loaded, self.cfg = loaded, cfg
        self.system_prompt = cfg.system_prompt
        self.messages: list[Message] = []
        self.cache = PromptCache(loaded.model)

    def ask(self, text: str) -> AnswerStream:
        self.messages.append({"role": "user", "content": text})
        return generate_answer(
            self.loaded,
            self.messages,
            system_prompt=self.system_prompt,
            max_tokens=self.cfg.max_tokens,
            cache=self.cache,
            allow_special=self.cfg.allow_special_tokens_in_content,
            **sampling_flags(self.cfg),
        )


def _print_stream(stream: AnswerStream) -> None:
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def interactive(conv: Conversation, name: str) -> None:
    """Read-eval loop; Ctrl-C during an answer stops that answer and keeps what was said."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(
        f"chatting with {name}. /reset, /system TEXT, /quit, /help; Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/bye"):
            return
        if text == "/help":
            print(HELP, end="", file=sys.stderr)
            continue
        if text == "/reset":
            conv.messages.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/system" or text.startswith("/system "):
            conv.system_prompt = text[len("/system") :].strip() or conv.cfg.system_prompt
            conv.messages.clear()
            print(
                f"(system prompt: {conv.system_prompt or 'default'}; conversation cleared)",
                file=sys.stderr,
            )
            continue
        if text.startswith("/") and " " not in text:
            print(f"(unknown command {text}; /help lists them)", file=sys.stderr)
            continue
        stream = None
        try:
            stream = conv.ask(line)
            _print_stream(stream)
        except MlxLoraError as e:  # e.g. the template rejects this conversation: keep chatting
            conv.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            print("\n(stopped)", file=sys.stderr)
        if stream is None or not stream.answer.text:  # as if the question was not asked
            conv.messages.pop()
        else:
            conv.messages.append({"role": "assistant", "content": stream.answer.text})
        if stream is not None:
            print(stream.answer.stats(), file=sys.stderr)


def sampling_flags(cfg: ChatConfig) -> dict[str, Any]:
    """The sampling flags given on the command line (unset ones stay None: model defaults)."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    return {k: getattr(cfg, k) for k in keys}


def main(argv: list[str] | None = None) -> None:
    cfg: ChatConfig = parse_config(
        ChatConfig,
        argv,
        prog="python -m mlx_lora.chat",
        description="Chat with a model and LoRA adapter (or a fused folder): one answer with "
        "--prompt, a conversation without.",
        epilog=HELP + "\nexample:\n  python -m mlx_lora.chat --adapter output --prompt '你是谁？' "
        "--temperature 0\n",
    )
    if cfg.adapter is not None:  # bad input fails before a model is loaded
        read_adapter(Path(cfg.adapter))
    check_max_tokens(cfg.max_tokens, "--max-tokens")
    resolve_sampling({}, **sampling_flags(cfg))
    loaded = load_for_inference(cfg.model, cfg.adapter, source=cfg.model_source)
    require_chat_template(loaded)
    conv = Conversation(loaded, cfg)
    if cfg.prompt is not None:
        stream = conv.ask(cfg.prompt)
        _print_stream(stream)
        print(stream.answer.stats(), file=sys.stderr)
        return
    name = str(loaded.model_dir) + (f" + {cfg.adapter}" if cfg.adapter else "")
    interactive(conv, name)
