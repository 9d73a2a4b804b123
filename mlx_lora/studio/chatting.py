"""The Chat tab: models loaded once, answers streamed by the one generation function.

Loading is :func:`mlx_lora.model.load.load_for_inference` and generation
:func:`mlx_lora.infer.generate.generate_answer`, exactly what ``python -m mlx_lora.chat`` runs, so a
greedy answer on the page is the command's answer. One worker thread owns every model (MLX
streams belong to the thread that made them, as in serve): requests queue up, answers are
generated one at a time, and at most two models stay loaded (the adapter's and the base beside it).

Compare mode answers one conversation with several runs of one base: the base is loaded once as an
adapter set (:func:`mlx_lora.model.load.load_adapter_set`, what serve loads for several adapters)
and each column's answer comes from the same ``generate_answer`` with its adapter switched in, so
each is the answer that adapter gives alone.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.infer.generate import generate_answer, require_chat_template
from mlx_lora.model.load import load_adapter_set, load_for_inference
from mlx_lora.studio.fields import MAX_NUMBER, flag, text


class Disconnected(Exception):
    """The browser went away while an answer was streaming."""


class Request:
    """One answer on its way: the worker puts ``(kind, value)`` events, the HTTP thread reads them.

    Kinds: ``start`` (settings accepted), ``delta`` (text), ``done`` (stats), ``error``
    (an exception). ``cancel`` tells the worker to stop generating (the browser disconnected).
    """

    def __init__(self, work: Callable[[Request], None]):
        self.work = work
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.cancel = threading.Event()


class ChatModels:
    """The worker thread, its small LRU of loaded models and its FIFO of requests."""

    def __init__(self, limit: int = 2):
        self.limit = limit
        self.cache: OrderedDict[tuple, Any] = OrderedDict()
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="studio-mlx", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while (req := self.requests.get()) is not None:
                try:
                    req.work(req)
                except Exception as e:  # noqa: BLE001 - reported to the page; the worker lives on
                    req.events.put(("error", e))
        finally:  # streams made by this thread must be freed by it (ml-explore/mlx#3126)
            import mlx.core as mx

            mx.clear_streams()

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=60)

    def _cached(self, key: tuple, what: str, load: Callable[[], Any]) -> Any:
        """The model under ``key``, loaded by ``load`` if not yet (``what`` names it in errors)."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        try:
            loaded = load()
        except MlxLoraError:
            raise
        except Exception as e:  # noqa: BLE001 - a model that does not load is the user's to fix
            first = str(e).splitlines()[0] if str(e) else ""
            raise MlxLoraError(
                f"cannot load {what} ({type(e).__name__}: {first}); check the folder"
            ) from None
        require_chat_template(loaded)
        self.cache[key] = loaded
        while len(self.cache) > self.limit:
            self.cache.popitem(last=False)
        return loaded

    def _get(self, model: str | None, adapter: Path | None) -> Any:
        """Base (+ adapter) or a fused folder; ``model`` None = the adapter's recorded base."""
        key = (model, str(adapter) if adapter else None)
        return self._cached(key, str(model or adapter), lambda: load_for_inference(model, adapter))

    def _get_set(self, model: str, adapters: dict[str, Path]) -> Any:
        """``model`` loaded once with every adapter of ``adapters`` (name → folder) beside it."""
        key = ("adapter set", model, *sorted((n, str(d)) for n, d in adapters.items()))
        return self._cached(key, model, lambda: load_adapter_set(model, adapters))

    def ask(
        self, model: str | None, adapter: Path | None, messages: list[dict], settings: dict
    ) -> Request:
        """Queue one answer; read its events from the returned request."""

        def work(req: Request) -> None:
            loaded = self._get(model, adapter)
            # bad settings, or a template that rejects the conversation, fail here: before a
            # byte of the answer is sent (generation starts when the stream is iterated)
            stream = generate_answer(loaded, messages, **settings)
            req.events.put(("start", None))
            done = _relay(req, stream)
            if done is not None:
                req.events.put(("done", done))

        return self._queue(work)

    def compare(
        self,
        model: str,
        adapters: dict[str, Path],
        columns: list[tuple[str | None, list[dict]]],
        settings: dict,
    ) -> Request:
        """Queue the answers of several adapters on one base, one column after the other.

        ``columns``: (adapter name in ``adapters`` or None for the bare base, its conversation).
        Each answer is the one :meth:`ask` gives that adapter alone (same ``generate_answer``,
        the adapter switched in place by :class:`~mlx_lora.model.lora.AdapterSet`). Events:
        ``line`` ``{"column", "delta"}`` and ``{"column", "done", …}`` per column, then ``done``
        ``{"end": true}``.
        """

        def work(req: Request) -> None:
            loaded = self._get_set(model, adapters)
            streams = [generate_answer(loaded, m, adapter=a, **settings) for a, m in columns]
            req.events.put(("start", None))
            for i, stream in enumerate(streams):
                done = _relay(req, stream, column=i)
                if done is None:
                    return
                req.events.put(("line", {"column": i, **done}))
            req.events.put(("done", {"end": True, "columns": len(streams)}))

        return self._queue(work)

    def _queue(self, work: Callable[[Request], None]) -> Request:
        req = Request(work)
        self.requests.put(req)
        return req


def _relay(req: Request, stream: Any, column: int | None = None) -> dict | None:
    """Pass ``stream``'s pieces to the page (tagged with ``column`` when given); its counts at
    the end, or None when the browser went away (generation stopped)."""
    for piece in stream:
        if req.cancel.is_set():
            stream.close()  # mlx-lm stops; the KV cache stays consistent
            return None
        if column is None:
            req.events.put(("delta", piece))
        else:
            req.events.put(("line", {"column": column, "delta": piece}))
    a = stream.answer
    return {
        "done": True,
        "text": a.text,
        "finish_reason": a.finish_reason,
        "completion_tokens": a.completion_tokens,
        "prompt_tokens": a.prompt_tokens,
        "tokens_per_second": round(a.generation_tps, 1),
        "stats": a.stats(),
    }


def sampling_settings(body: dict) -> dict:
    """The page's settings as :func:`generate_answer` keywords; empty = the model's defaults."""
    out: dict[str, Any] = {}
    casts = {
        "temperature": float,
        "top_p": float,
        "top_k": int,
        "max_tokens": int,
        "seed": int,
        "repetition_penalty": float,
    }
    for key, cast in casts.items():
        value = body.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            out[key] = cast(flag(key, value, cast))  # refuses true, lists, 1e300, 1.5 for an int
            continue
        try:
            number = cast(value)
        except ValueError:
            raise MlxLoraError(f"{key}: {value[:40]!r} is not a number") from None
        if not math.isfinite(number) or abs(number) > MAX_NUMBER:
            raise MlxLoraError(f"{key}: {value[:40]!r} is out of range")
        out[key] = number
    system = text(body, "system_prompt")
    if system is not None and system.strip():
        out["system_prompt"] = system
    return out


def check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MlxLoraError("messages: send at least one user message")
    for m in messages:
        if not (
            isinstance(m, dict)
            and m.get("role") in ("user", "assistant", "system")
            and isinstance(m.get("content"), str)
        ):
            raise MlxLoraError("messages: each needs a role (user/assistant/system) and content")
    if messages[-1]["role"] != "user":
        raise MlxLoraError("messages: the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
