"""Generating an answer: the one function chat, serve, verify and the studio share.

The seed's "garbled answers" came from prompts built with the wrong template and from generation
that did not stop at the model's end-of-turn token. Here every answer renders the whole
conversation with the tokenizer's own template (:func:`mlx_lora.model.prompt.build_prompt`, exactly
what
training saw; message contents are text, never control tokens), stops on every end token the
model's files name (:func:`mlx_lora.model.meta.end_token_ids`), and leaves sampling and streaming to
mlx-lm. The KV cache of the previous turn is reused only for the token prefix the new prompt
shares with it, so reuse saves time without changing a single token.

Kept here rather than taken from mlx-lm 0.32: :class:`PromptCache` (mlx-lm's ``LRUPromptCache``
is its server's internal multi-conversation cache; one worker serving one conversation at a time
needs only the shared-prefix trim, done with mlx-lm's public ``trim_prompt_cache``) and
:class:`StopStrings` (mlx-lm's stop sequences work on token ids inside its server; here stop
strings are cut from the decoded text stream, so no part of one is ever shown, even when it is
split across tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.meta import end_token_ids, sampling_defaults
from mlx_lora.model.prompt import Message, encode_prompt, has_chat_template

MAX_TOKENS_LIMIT = 1 << 31


class BadParameter(MlxLoraError):
    """A sampling parameter out of range; ``param`` names it (serve puts it in the error body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_max_tokens(max_tokens: int, name: str = "max_tokens") -> None:
    """The answer-length limit every entry point accepts (chat, serve, the studio)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadParameter("max_tokens", f"{name} must be an integer, got {max_tokens!r}")
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadParameter(
            "max_tokens",
            f"{name} must be at least 1 and at most {MAX_TOKENS_LIMIT}, got {max_tokens}",
        )


def stop_token_ids(loaded: Any) -> set[int]:
    """Make mlx-lm's ``stream_generate`` stop on every end token
    (:func:`mlx_lora.model.meta.end_token_ids`) by adding them to the tokenizer wrapper's eos set;
    returns the full set. Idempotent."""
    wrapper = loaded.tokenizer
    done = getattr(wrapper, "_mlx_lora_stop_ids", None)
    if done is not None and done <= set(wrapper.eos_token_ids):
        return set(wrapper.eos_token_ids)
    ids = set(wrapper.eos_token_ids) | set(end_token_ids(wrapper, loaded.generation))
    wrapper.eos_token_ids = ids
    wrapper._mlx_lora_stop_ids = frozenset(ids)
    return set(ids)


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings: what the user asked for, else ``generation_config.json``'s."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None

    def check(self) -> None:
        """Raise :class:`BadParameter` for values mlx-lm would reject or misread."""
        if not 0 <= self.temperature <= 2:
            raise BadParameter(
                "temperature",
                f"temperature must be between 0 and 2 (0 = greedy), got {self.temperature}",
            )
        if not 0 <= self.top_p <= 1:
            raise BadParameter("top_p", f"top_p must be between 0 and 1, got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise BadParameter("min_p", f"min_p must be between 0 and 1, got {self.min_p}")
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
    generation: dict,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
) -> Sampling:
    """Fill every setting not given (None) from the model's ``generation_config.json`` (as read by
    :func:`mlx_lora.model.meta.sampling_defaults`) and check the result. Without one: greedy."""
    d = sampling_defaults(generation)

    def pick(given: Any, key: str, fallback: Any) -> Any:
        return given if given is not None else d.get(key, fallback)

    s = Sampling(
        temperature=float(pick(temperature, "temperature", 0.0)),
        top_p=float(pick(top_p, "top_p", 1.0)),
        top_k=int(pick(top_k, "top_k", 0)),
        min_p=float(pick(min_p, "min_p", 0.0)),
        repetition_penalty=pick(repetition_penalty, "repetition_penalty", None),
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
    sampler = make_sampler(temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
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
        # special-token texts of the message contents that were encoded as plain text
        self.escaped: dict[str, int] = {}
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
            "be rendered; chat with a chat model, or a fine-tune whose base has a template"
        )


def generate_answer(
    loaded: Any,
    messages: list[Message],
    *,
    system_prompt: str | None = None,
    max_tokens: int = 512,
    stop: Sequence[str] = (),
    cache: PromptCache | None = None,
    allow_special: bool = False,
    **sampling: Any,
) -> AnswerStream:
    """Stream the assistant's next answer to ``messages`` (chat, serve and the studio call this).

    ``system_prompt`` None means the one the adapter was trained with (else the template's own);
    a system turn inside ``messages`` wins over both. ``sampling`` holds :func:`resolve_sampling`'s
    keywords (temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, seed); unset ones come from ``generation_config.json``. Pass the same
    ``cache`` turn after turn to reuse the shared prefix. Special-token text in the messages is
    encoded as text unless ``allow_special`` (``--allow-special-tokens-in-content``).
    """
    check_max_tokens(max_tokens)
    settings = resolve_sampling(loaded.generation, **sampling)
    require_chat_template(loaded)
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    prompt = encode_prompt(loaded.tokenizer, messages, system, allow_special=allow_special)
    stream = AnswerStream(loaded, prompt.ids, settings, max_tokens, stop, cache)
    stream.escaped = dict(prompt.escaped)
    return stream


def complete(loaded: Any, messages: list[Message], **kw: Any) -> Answer:
    """The whole answer at once (same arguments as :func:`generate_answer`)."""
    stream = generate_answer(loaded, messages, **kw)
    for _ in stream:
        pass
    return stream.answer
