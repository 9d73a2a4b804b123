"""llama.cpp through llama-cpp-python: the runtime Ollama and llama-server use, as a referee.

Verify, the quantizer, the import of GGUF models and the tests all ask llama.cpp the same few
things (load a GGUF, tokenize, logits for every position, a greedy continuation); they live here.
llama-cpp-python is the optional ``verify`` extra and is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.errors import MlxLoraError

INSTALL_HINT = 'pip install "mlx_lora[verify]"'


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python is importable (the optional ``verify`` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp logs from C even with verbose=False; keep the report readable."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def open_llama(
    gguf_path: Path, *, n_ctx: int = 512, lora_path: Path | None = None, vocab_only: bool = False
) -> Any:
    """A llama-cpp-python model: f32 KV cache where the binding allows it, all positions' logits."""
    import llama_cpp

    kw: dict[str, Any] = {
        "model_path": str(gguf_path),
        "verbose": False,
        "n_threads": os.cpu_count() or 1,
    }
    if vocab_only:
        kw["vocab_only"] = True
    else:
        kw.update(n_ctx=n_ctx, n_batch=n_ctx, logits_all=True)
        f32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
        kw.update(type_k=f32, type_v=f32)
    if lora_path is not None:
        kw["lora_path"] = str(lora_path)
    with quiet_stderr():
        try:
            return llama_cpp.Llama(**kw)
        except TypeError:  # an older binding without type_k/type_v
            kw.pop("type_k", None)
            kw.pop("type_v", None)
            return llama_cpp.Llama(**kw)
        except ValueError as e:
            raise MlxLoraError(
                "llama.cpp cannot load "
                f"{gguf_path}{' with ' + str(lora_path) if lora_path else ''}: {e}"
            ) from None


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    with quiet_stderr():
        llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    with quiet_stderr():
        llm.eval(ids)
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
    return out


def llama_tokenize(llm: Any, text: str, *, add_special: bool = False) -> list[int]:
    """llama.cpp's ids for ``text``, special tokens parsed. ``add_special=True`` is how
    llama-server (and so Ollama) tokenizes a prompt: BOS/EOS added as the GGUF's
    ``tokenizer.ggml.add_bos_token``/``add_eos_token`` say."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))
