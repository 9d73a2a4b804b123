"""``python -m mlx_lora.chat``: talk to a base model + adapter (or a fused folder), and the one
generation function that chat and serve share.

The seed's "garbled answers" came from prompts built with the wrong template and from generation
that did not stop at the model's end-of-turn token. Here every turn re-renders the whole
conversation with the tokenizer's own template (:func:`mlx_lora.prompt.build_prompt`, exactly what
training saw), stops on every end token the model's files name, and leaves sampling and streaming to
mlx-lm. The KV cache of the previous turn is reused only for the token prefix the new prompt shares
with it, so reuse saves time without changing a single token.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.cli import run
from mlx_lora.config import ChatConfig, parse_config
from mlx_lora.errors import MlxLoraError
from mlx_lora.prompt import Message, build_prompt, end_of_turn, has_chat_template, hf_tokenizer

# Special tokens that end a turn in the ChatML family (Qwen, Yi, ...), whatever the config says.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


class BadParameter(MlxLoraError):
    """A sampling parameter out of range; ``param`` names it (serve reports it in the error body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def generation_config(model_dir: Path) -> dict:
    """``generation_config.json`` of the model folder, or ``{}`` (the model's own sampling advice)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stop_token_ids(loaded: Any) -> set[int]:
    """Make generation stop on every end token the model's files name; returns the full id set.

    The tokenizer's eos, each id of ``generation_config.json``'s ``eos_token_id``, the template's
    end-of-turn token, and ``<|im_end|>`` / ``<|endoftext|>`` when the vocabulary has them are added
    to the mlx-lm tokenizer wrapper's eos set, which ``stream_generate`` stops on. Idempotent.
    """
    wrapper = loaded.tokenizer
    done = getattr(wrapper, "_mlx_lora_stop_ids", None)
    if done is not None and done <= set(wrapper.eos_token_ids):
        return set(wrapper.eos_token_ids)  # get_vocab() of a 150k vocabulary costs ~60 ms
    tok = hf_tokenizer(wrapper)
    ids: set[int] = set(wrapper.eos_token_ids)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    eos = generation_config(loaded.model_dir).get("eos_token_id")
    for i in eos if isinstance(eos, list) else [eos]:
        if isinstance(i, int) and not isinstance(i, bool):
            ids.add(i)
    names = list(END_TOKENS)
    if has_chat_template(tok):
        try:
            names.append(end_of_turn(tok))
        except MlxLoraError:
            pass
    vocab = tok.get_vocab()
    ids.update(vocab[name] for name in names if name in vocab)
    wrapper.eos_token_ids = ids
    if wrapper is not tok:
        wrapper._mlx_lora_stop_ids = frozenset(ids)
    return set(ids)


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings: what the user asked for, else ``generation_config.json``'s."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None

    def check(self) -> None:
        """Raise :class:`BadParameter` for values mlx-lm would reject or misread."""
        if not 0 <= self.temperature <= 100:
            raise BadParameter(
                "temperature",
                f"temperature must be between 0 and 100 (0 = greedy), got {self.temperature}",
            )
        if not 0 <= self.top_p <= 1:
            raise BadParameter("top_p", f"top_p must be between 0 and 1, got {self.top_p}")
        if self.top_k < 0:
            raise BadParameter("top_k", f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise BadParameter(
                "repetition_penalty",
                f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise BadParameter(name, f"{name} must be between -2 and 2, got {value}")


def resolve_sampling(
    model_dir: Path,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
) -> Sampling:
    """Fill every setting not given (None) from ``generation_config.json`` and check the result.

    ``do_sample: false`` there means greedy, as in transformers. Without a file: greedy, no penalty.
    """
    gen = generation_config(model_dir)

    def default(key: str, fallback: Any) -> Any:
        value = gen.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else fallback

    if temperature is None:
        temperature = 0.0 if gen.get("do_sample") is False else float(default("temperature", 0.0))
    s = Sampling(
        temperature=float(temperature),
        top_p=float(top_p if top_p is not None else default("top_p", 1.0)),
        top_k=int(top_k if top_k is not None else default("top_k", 0)),
        repetition_penalty=repetition_penalty
        if repetition_penalty is not None
        else default("repetition_penalty", None),
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    s.check()
    return s


def _sampler_and_processors(s: Sampling, history: Sequence[int]) -> tuple[Any, list[Any]]:
    """mlx-lm's sampler and logits processors; ``history`` = prompt tokens already in the cache.

    mlx-lm's processors see only the tokens passed to ``stream_generate``; with a reused cache that
    is just the new suffix, so the cached prefix is put back in front: penalties then see the same
    tokens as with a fresh cache, and reuse changes nothing.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    temp = 0.0 if s.top_p == 0 else s.temperature  # keeping 0 % of the mass = the top token
    sampler = make_sampler(temp, top_p=s.top_p, top_k=s.top_k)
    rp = s.repetition_penalty if s.repetition_penalty not in (None, 1, 1.0) else None
    procs = make_logits_processors(
        repetition_penalty=rp,
        presence_penalty=s.presence_penalty or None,
        frequency_penalty=s.frequency_penalty or None,
    )
    if procs and history:
        prefix = mx.array(list(history))

        def with_prefix(proc: Any) -> Any:
            return lambda tokens, logits: proc(
                mx.concatenate([prefix, tokens.astype(prefix.dtype)]), logits
            )

        procs = [with_prefix(p) for p in procs]
    return sampler, procs


class PromptCache:
    """An mlx-lm KV cache plus the exact token ids it holds.

    :meth:`reuse` trims the cache to the longest prefix it shares with the next prompt (at least one
    prompt token is always left to compute, as mlx-lm needs). Any doubt (an interrupted forward
    pass, an untrimmable cache) empties it instead: a wrong cache would silently change answers.
    """

    def __init__(self, model: Any):
        self.model = model
        self.cache: list[Any] | None = None
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def reuse(self, ids: Sequence[int]) -> int:
        """Prepare for prompt ``ids``; returns how many leading ids are already in the cache."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        n = 0
        for a, b in zip(self.tokens, ids, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        if self.cache is not None and n > 0 and can_trim_prompt_cache(self.cache):
            drop = len(self.tokens) - n
            if drop == 0 or trim_prompt_cache(self.cache, drop) == drop:
                self.tokens = self.tokens[:n]
                return n
        self.cache, self.tokens = make_prompt_cache(self.model), []
        return 0

    def commit(self, tokens: Sequence[int]) -> None:
        """Record what the cache holds after generating: ``tokens`` up to the cache's offset."""
        offset = getattr(self.cache[0], "offset", None) if self.cache else None
        if not isinstance(offset, int) or offset > len(tokens):
            self.reset()
        else:
            self.tokens = list(tokens[:offset])


@dataclass
class Answer:
    """One generated answer and its counts (``usage`` in serve, the tokens/s line in chat)."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    tokens: list[int] = field(default_factory=list)  # generated ids, end token included

    def stats(self) -> str:
        return (
            f"[{self.completion_tokens} tokens, {self.generation_tps:.1f} tokens/s; "
            f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached), "
            f"{self.prompt_tps:.1f} tokens/s]"
        )


class StopStrings:
    """Cuts streamed text at the first stop string, holding back only what could still start one.

    ``feed`` returns ``(text safe to show, stopped)``. Shown text never contains any part of a stop
    string, even one split across many tokens.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def _held_back(self, text: str) -> int:
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        keep = 0 if final else self._held_back(buf)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False


class AnswerStream:
    """Text pieces of one answer as mlx-lm produces them; ``answer`` holds the counts so far
    (and the whole text once the stream is exhausted or closed).

    Iterate it to generate; ``close()`` (or leaving a ``for`` loop early) stops generation and keeps
    the cache usable. Stop strings are cut off and never shown, even split across tokens.
    """

    def __init__(
        self,
        loaded: Any,
        ids: list[int],
        sampling: Sampling,
        max_tokens: int,
        stop: Sequence[str],
        cache: PromptCache | None,
    ):
        self.prompt_ids = ids
        self.answer = Answer(prompt_tokens=len(ids))
        self._gen = self._run(loaded, ids, sampling, max_tokens, [s for s in stop if s], cache)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(
        self,
        loaded: Any,
        ids: list[int],
        s: Sampling,
        max_tokens: int,
        stops: list[str],
        cache: PromptCache | None,
    ) -> Iterator[str]:
        import mlx.core as mx
        from mlx_lm.generate import stream_generate

        cache = cache if cache is not None else PromptCache(loaded.model)
        stop_token_ids(loaded)
        reused = cache.reuse(ids)
        self.answer.cached_tokens = reused
        sampler, procs = _sampler_and_processors(s, ids[:reused])
        if s.seed is not None:
            mx.random.seed(s.seed % (1 << 64))  # OpenAI clients may send negative seeds
        generated = self.answer.tokens
        parts: list[str] = []
        cutter = StopStrings(stops)
        steps = stream_generate(
            loaded.model,
            loaded.tokenizer,
            mx.array(ids[reused:]),
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=procs,
            prompt_cache=cache.cache,
        )
        a = self.answer
        try:
            for r in steps:
                generated.append(int(r.token))
                a.completion_tokens = len(generated)
                a.prompt_tps, a.generation_tps = r.prompt_tps, r.generation_tps
                piece, stopped = cutter.feed(r.text, final=r.finish_reason is not None)
                a.finish_reason = "stop" if stopped else r.finish_reason
                if piece:
                    parts.append(piece)
                    yield piece
                if a.finish_reason is not None:
                    break
            steps.close()
            cache.commit(ids + generated)
        except GeneratorExit:  # the caller stopped reading at a yield: the cache is consistent
            steps.close()
            cache.commit(ids + generated)
            raise
        except BaseException:  # Ctrl-C may land inside a forward pass: never trust that cache
            cache.reset()
            raise
        finally:
            a.text = "".join(parts)


def require_chat_template(loaded: Any) -> None:
    """Conversations are rendered only with the model's own template; without one, say so."""
    if not has_chat_template(loaded.tokenizer):
        raise MlxLoraError(
            f"the tokenizer of {loaded.model_dir} has no chat template, so a conversation cannot "
            "be "
            "rendered; chat with a chat model, or a fine-tune whose base has a template"
        )


def generate_answer(
    loaded: Any,
    messages: list[Message],
    *,
    system_prompt: str | None = None,
    max_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    cache: PromptCache | None = None,
) -> AnswerStream:
    """Stream the assistant's next answer to ``messages`` (chat and serve both call this).

    ``system_prompt`` None means the one the adapter was trained with (else the template's own);
    a system turn inside ``messages`` wins over both. Unset sampling values come from
    ``generation_config.json``. Pass the same ``cache`` turn after turn to reuse the shared prefix.
    """
    if max_tokens < 1:
        raise BadParameter("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    sampling = resolve_sampling(
        loaded.model_dir,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    require_chat_template(loaded)
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    ids = build_prompt(loaded.tokenizer, messages, system)
    return AnswerStream(loaded, ids, sampling, max_tokens, stop, cache)


def complete(loaded: Any, messages: list[Message], **kw: Any) -> Answer:
    """The whole answer at once (same arguments as :func:`generate_answer`)."""
    stream = generate_answer(loaded, messages, **kw)
    for _ in stream:
        pass
    return stream.answer


# ---------------------------------------------------------------------------------------- CLI

HELP = """\
interactive commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    use TEXT as the system prompt and start over (/system alone: back to the default)
  /quit           leave (Ctrl-D too); Ctrl-C stops the current answer
"""


def check_adapter_dir(adapter: str | None) -> None:
    """Fail fast, before a model is loaded, on an adapter path that cannot be one."""
    if adapter is not None and not Path(adapter).is_dir():
        raise MlxLoraError(
            f"--adapter {adapter} is not a folder; pass the --output-dir of a training run (or "
            "one of its checkpoint-N folders)"
        )


class Conversation:
    """The interactive session's state: history, system prompt and the reused KV cache."""

    def __init__(self, loaded: Any, cfg: ChatConfig):
        self.loaded, self.cfg = loaded, cfg
        self.system_prompt = cfg.system_prompt
        self.messages: list[Message] = []
        self.cache = PromptCache(loaded.model)

    def ask(self, text: str) -> AnswerStream:
        self.messages.append({"role": "user", "content": text})
        c = self.cfg
        return generate_answer(
            self.loaded,
            self.messages,
            system_prompt=self.system_prompt,
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            repetition_penalty=c.repetition_penalty,
            seed=c.seed,
            cache=self.cache,
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
        if (
            stream is None or not stream.answer.text
        ):  # nothing said: as if the question was not asked
            conv.messages.pop()
        else:
            conv.messages.append({"role": "assistant", "content": stream.answer.text})
        if stream is not None:
            print(stream.answer.stats(), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    cfg: ChatConfig = parse_config(
        ChatConfig,
        argv,
        prog="python -m mlx_lora.chat",
        description="Chat with a model and LoRA adapter (or a fused folder): one answer with "
        "--prompt, a conversation without.",
        epilog=HELP
        + "\nexample:\n  python -m mlx_lora.chat --adapter output --prompt '你是谁？' --temperature "
        "0\n",
    )
    check_adapter_dir(cfg.adapter)
    if cfg.max_tokens < 1:
        raise MlxLoraError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    Sampling(
        temperature=cfg.temperature or 0.0,
        top_p=1.0 if cfg.top_p is None else cfg.top_p,
        top_k=cfg.top_k or 0,
        repetition_penalty=cfg.repetition_penalty,
    ).check()  # bad flags fail before a model is loaded

    from mlx_lora.model import load_for_inference

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


if __name__ == "__main__":
    sys.exit(run(main))
