"""Generating an answer: the one function chat, serve, verify and the studio share.

The seed's "garbled answers" came from prompts built with the wrong template and from generation
that did not stop at the model's end-of-turn token. Here every answer renders the whole
conversation with the tokenizer's own template (:func:`mlx_lora.model.prompt.build_prompt`, exactly
what
training saw; message contents are text, never control tokens), stops on every end token the
model's files name (:func:`mlx_lora.model.meta.end_token_ids`), never runs past the context
(``config.json``'s ``max_position_embeddings``), and leaves the decoding itself to mlx-lm's
``BatchGenerator`` (:class:`Engine`: chat decodes a batch of one, serve batches its clients, and a
greedy answer is the same either way). The KV cache of the previous turn is reused only for the
token prefix the new prompt shares with it, so reuse saves time without changing a single token.

Kept here rather than taken from mlx-lm 0.32: :class:`PromptCache` (mlx-lm's ``LRUPromptCache``
is its server's internal multi-conversation cache; a conversation needs only the shared-prefix
trim, done with mlx-lm's public ``trim_prompt_cache``, and serve keeps a small pool of them) and
:class:`StopStrings` (mlx-lm's stop sequences work on token ids inside its server; here stop
strings are cut from the decoded text stream, so no part of one is ever shown, even when it is
split across tokens).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.meta import (
    context_length,
    end_token_ids,
    sampling_defaults,
    training_system_prompt,
)
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
    """Every end token (:func:`mlx_lora.model.meta.end_token_ids`): the :class:`Engine`'s stop
    tokens, also added to the tokenizer wrapper's eos set for mlx-lm's own loops (verify's
    reference greedy); returns the full set. Idempotent."""
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


class PromptTooLong(BadParameter):
    """The prompt alone fills the model's context: no room for a single answer token."""


class Engine:
    """The one decoding loop: continuous batching over mlx-lm's ``BatchGenerator``.

    Every answer (chat's, the studio's, serve's) is an :class:`AnswerStream` decoded here; chat
    runs an engine of one, serve one engine for all its clients, where new answers join the batch
    between two steps and finished or abandoned ones leave it. Only the thread that steps an
    engine may add to it or close its streams (MLX state is per thread).
    """

    def __init__(self, loaded: Any, max_concurrency: int = 1):
        self.loaded = loaded
        self.capacity = max(1, int(max_concurrency))
        self._ends = [[t] for t in sorted(stop_token_ids(loaded))]
        # one batch per adapter (None: the model as loaded); each step runs every non-empty one
        self._gens: dict[str | None, Any] = {}
        self.live: dict[tuple[str | None, int], AnswerStream] = {}

    def _batch(self, adapter: str | None) -> Any:
        from mlx_lm.generate import BatchGenerator

        if adapter not in self._gens:
            self._gens[adapter] = BatchGenerator(
                self.loaded.model,
                stop_tokens=self._ends,
                completion_batch_size=self.capacity,
                prefill_batch_size=self.capacity,
            )
        return self._gens[adapter]

    def __len__(self) -> int:
        return len(self.live)

    def add(self, stream: AnswerStream) -> None:
        """Queue ``stream`` into the batch (its prompt is computed over the next steps)."""
        from mlx_lm.sample_utils import make_sampler

        cache = stream.cache if stream.cache is not None else PromptCache(self.loaded.model)
        stream.cache = cache
        ids, s = stream.prompt_ids, stream.sampling
        reused = cache.reuse(ids)
        stream.answer.cached_tokens = reused
        temp = 0.0 if s.top_p == 0 else s.temperature  # keeping 0 % of the mass = the top token
        sampler = None
        if temp > 0:  # greedy rows share one batched argmax
            sampler = make_sampler(temp, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
        if s.seed is not None:
            import mlx.core as mx

            mx.random.seed(s.seed % (1 << 64))  # OpenAI clients may send negative seeds
        (uid,) = self._batch(stream.adapter).insert(
            [ids[reused:]],
            max_tokens=[stream.max_tokens],
            caches=[cache.cache],
            all_tokens=[list(ids[:reused])],
            samplers=[sampler],
            logits_processors=[_processors(s)],
        )
        stream.uid = uid
        stream.started = time.perf_counter()
        self.live[(stream.adapter, uid)] = stream

    def step(self) -> None:
        """One decoding step of every answer in the batch (and a slice of the waiting prompts)."""
        busy = {key for key, _ in self.live}
        for adapter, gen in self._gens.items():
            if adapter in busy:
                self._step(adapter, gen)

    def _step(self, adapter: str | None, gen: Any) -> None:
        if self.loaded.adapter_set is not None:
            self.loaded.adapter_set.use(adapter)
        try:
            _, responses = gen.next()
        except BaseException as e:  # Ctrl-C may land inside a forward pass: drop every cache
            for stream in list(self.live.values()):
                self._drop(stream, e)
            self._gens.clear()
            raise
        for r in responses:
            stream = self.live.get((adapter, r.uid))
            if stream is None:
                continue
            stream._token(int(r.token), r.finish_reason)
            if r.finish_reason is not None:
                del self.live[(adapter, r.uid)]
                stream.cache.cache = r.prompt_cache
                stream._finish()
            elif stream.done:  # a stop string ended it: it leaves the batch now
                self.close(stream)

    def close(self, stream: AnswerStream) -> None:
        """Take ``stream`` out of the batch now, keeping its KV cache for the next turn."""
        key = (stream.adapter, stream.uid)
        if stream.uid is None or self.live.pop(key, None) is None:
            return
        gen = self._batch(stream.adapter)
        kept = gen.remove([stream.uid], return_prompt_caches=True).get(stream.uid)
        if kept is not None and stream.answer.tokens:  # its prompt was computed: cache is whole
            stream.cache.cache = kept[0]
        else:
            stream.cache.reset()
        stream._finish()

    def _drop(self, stream: AnswerStream, error: BaseException) -> None:
        self.live.pop((stream.adapter, stream.uid), None)
        stream.cache.reset()
        stream.error = error
        stream.done = True


def _processors(s: Sampling) -> list[Any]:
    """mlx-lm's logits processors (penalties). The batch gives them every token in the cache
    (the reused prefix included), so a reused cache changes no token."""
    from mlx_lm.sample_utils import make_logits_processors

    rp = s.repetition_penalty if s.repetition_penalty not in (None, 1, 1.0) else None
    return make_logits_processors(
        repetition_penalty=rp,
        presence_penalty=s.presence_penalty or None,
        frequency_penalty=s.frequency_penalty or None,
    )


class AnswerStream:
    """Text pieces of one answer as the :class:`Engine` decodes them; ``answer`` holds the counts
    so far (and the whole text once the stream is exhausted or closed).

    Iterate it to generate (it then steps an engine of its own); ``close()`` (or leaving a ``for``
    loop early) stops generation and keeps the cache usable. A server passes its shared engine
    instead, steps it itself and reads :meth:`take`. Stop strings are cut off and never shown,
    even split across tokens.
    """

    def __init__(
        self,
        loaded: Any,
        ids: list[int],
        sampling: Sampling,
        max_tokens: int,
        stop: Sequence[str],
        cache: PromptCache | None,
        engine: Engine | None = None,
        adapter: str | None = None,
    ):
        self.loaded, self.prompt_ids, self.sampling = loaded, ids, sampling
        self.adapter = adapter  # the name in loaded.adapter_set (None: the model as loaded)
        self.max_tokens, self.cache, self.engine = max_tokens, cache, engine
        self.answer = Answer(prompt_tokens=len(ids))
        # special-token texts of the message contents that were encoded as plain text
        self.escaped: dict[str, int] = {}
        self.uid: int | None = None
        self.done = False
        self.error: BaseException | None = None
        self.started = self.first = 0.0
        self._pending: deque[str] = deque()
        self._parts: list[str] = []
        self._cutter = StopStrings([s for s in stop if s])
        self._detok = loaded.tokenizer.detokenizer
        self._detok.reset()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pending:
            if self.error is not None:
                raise self.error
            if self.done:
                raise StopIteration
            if self.engine is None:
                self.engine = Engine(self.loaded, 1)
            if self.uid is None:
                self.engine.add(self)
            self.engine.step()
        return self._pending.popleft()

    def take(self) -> list[str]:
        """The pieces decoded since the last call (for a caller that steps the engine itself)."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def close(self) -> None:
        if self.engine is not None and not self.done:
            self.engine.close(self)
        self.done = True

    def _token(self, token: int, finish: str | None) -> None:
        """One generated token: counts, text (an end token shows none), stop strings."""
        a = self.answer
        if not a.tokens:
            self.first = time.perf_counter()
            computed = a.prompt_tokens - a.cached_tokens
            a.prompt_tps = computed / max(self.first - self.started, 1e-9)
        a.tokens.append(token)
        a.completion_tokens = len(a.tokens)
        a.generation_tps = (a.completion_tokens - 1) / max(time.perf_counter() - self.first, 1e-9)
        if finish != "stop":
            self._detok.add_token(token)
        if finish is not None:
            self._detok.finalize()
        piece, stopped = self._cutter.feed(self._detok.last_segment, final=finish is not None)
        a.finish_reason = "stop" if stopped else finish
        if piece:
            self._parts.append(piece)
            self._pending.append(piece)
        self.done = a.finish_reason is not None
        a.text = "".join(self._parts)

    def _finish(self) -> None:
        self.cache.commit(self.prompt_ids + self.answer.tokens)
        self.done = True


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
    engine: Engine | None = None,
    adapter: str | None = None,
    **sampling: Any,
) -> AnswerStream:
    """Stream the assistant's next answer to ``messages`` (chat, serve and the studio call this).

    ``system_prompt`` None means the one the adapter was trained with (else the template's own);
    a system turn inside ``messages`` wins over both. ``sampling`` holds :func:`resolve_sampling`'s
    keywords (temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
    frequency_penalty, seed); unset ones come from ``generation_config.json``. Pass the same
    ``cache`` turn after turn to reuse the shared prefix. Special-token text in the messages is
    encoded as text unless ``allow_special`` (``--allow-special-tokens-in-content``). The answer
    ends where the context does: ``max_tokens`` is capped at the context length minus the prompt,
    and a prompt that fills the context raises :class:`PromptTooLong`. ``engine``: decode in that
    (shared, batched) engine, stepped by its owner, instead of one of the stream's own.
    ``adapter``: answer with that adapter of ``loaded.adapter_set`` (its training system prompt
    too).
    """
    check_max_tokens(max_tokens)
    settings = resolve_sampling(loaded.generation, **sampling)
    require_chat_template(loaded)
    if adapter is not None and system_prompt is None:
        system_prompt = training_system_prompt(
            loaded.model_dir, loaded.adapter_set.adapters[adapter]
        )
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    prompt = encode_prompt(loaded.tokenizer, messages, system, allow_special=allow_special)
    n, ctx = len(prompt.ids), context_length(loaded.config)
    if n >= ctx:
        raise PromptTooLong(
            "messages",
            f"the prompt is {n} tokens, but the model's context is {ctx} tokens (prompt and "
            "answer together); send a shorter conversation",
        )
    max_tokens = min(max_tokens, ctx - n)
    stream = AnswerStream(loaded, prompt.ids, settings, max_tokens, stop, cache, engine, adapter)
    stream.escaped = dict(prompt.escaped)
    return stream


def complete(loaded: Any, messages: list[Message], **kw: Any) -> Answer:
    """The whole answer at once (same arguments as :func:`generate_answer`)."""
    stream = generate_answer(loaded, messages, **kw)
    for _ in stream:
        pass
    return stream.answer
