"""llama.cpp through llama-cpp-python: the runtime Ollama and llama-server use, as a referee.

Verify, the quantizer, the import of GGUF models and the tests all ask llama.cpp the same few
things (load a GGUF, tokenize, logits for every position, a greedy continuation); they live here.
llama-cpp-python is the optional ``verify`` extra and is imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.core.errors import MlxLoraError

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


def token_scores(llm: Any, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What perplexity and agreement need from one text, without keeping ``[n, vocab]`` logits:
    the log-probability of each next token (``ids[1:]``) and the top-1 token at every position."""
    logits = llama_logits(llm, ids)
    return next_token_logprobs(logits, ids), logits.argmax(-1)


def next_token_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """``log p(ids[i + 1] | ids[:i + 1])`` from logits ``[len(ids), vocab]`` (sums in float64)."""
    x = np.asarray(logits[:-1], dtype=np.float32)
    peak = x.max(-1, keepdims=True)
    z = np.exp(x - peak).sum(-1, dtype=np.float64)
    picked = x[np.arange(len(x)), np.asarray(ids[1:])].astype(np.float64)
    return picked - peak[:, 0] - np.log(z)


_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FALLBACK = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
    r".*?falling back to\s+(\S+)"
)


@dataclass
class QuantizeLog:
    """What llama.cpp's quantizer said: the tensors it passed, and which fell back to another type
    because their rows do not split into the type's blocks (256 values for K-quants)."""

    text: str = ""
    fallbacks: list[dict] = field(default_factory=list)

    def parse(self) -> None:
        for m in _FALLBACK.finditer(self.text.replace("\n->", " ->")):
            name, ncols, block, wanted, got = m.groups()
            self.fallbacks.append(
                {
                    "tensor": name,
                    "ncols": int(ncols),
                    "block": int(block),
                    "wanted": wanted,
                    "used": got,
                }
            )

    def last_error(self) -> str:
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return (errors or lines or ["no message"])[-1]


def llama_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
    dry_run: bool = False,
) -> QuantizeLog:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp's own quantizer (what
    ``llama-quantize`` runs), optionally with an importance matrix (GGUF tensor name → per-column
    weights). ``on_tensor(i, n, name)`` is called as each tensor starts (progress). ``dry_run``:
    only compute the sizes (llama.cpp logs them; nothing is written)."""
    import ctypes

    import llama_cpp

    log = QuantizeLog()

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        try:
            piece = text.decode("utf-8", "replace")
            log.text += piece
            m = _TENSOR_LINE.search(piece)
            if m and on_tensor is not None:
                on_tensor(int(m.group(1)), int(m.group(2)), m.group(3))
        except Exception:  # noqa: BLE001 - an exception must never cross into C
            pass

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = os.cpu_count() or 1
    params.dry_run = dry_run
    keep = _imatrix_array(imatrix) if imatrix else None
    if keep is not None:
        params.imatrix = keep[0]
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    finally:
        _restore_llama_log(llama_cpp)
    log.parse()
    if rc != 0:
        raise MlxLoraError(f"llama.cpp could not quantize {src}: {log.last_error()}")
    return log


def _imatrix_array(imatrix: dict[str, np.ndarray]) -> tuple[Any, list]:
    """A NULL-terminated ``llama_model_imatrix_data`` array (and the buffers it points into)."""
    import ctypes

    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    buffers: list = []
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        buffers += [arr, name.encode()]
        entries[i].name = buffers[-1]
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(imatrix)].name = None
    return entries, buffers


def _restore_llama_log(llama_cpp: Any) -> None:
    """Give llama-cpp-python its own log callback back (its ``verbose`` flag then works again)."""
    import ctypes

    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError):
        llama_cpp.llama_log_set(None, ctypes.c_void_p(0))
