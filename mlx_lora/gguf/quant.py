"""The GGUF types people run (q4_K_M, q5_K_M, q6_K, ...), made by llama.cpp's own quantizer.

Ollama's default is q4_K_M, not f16. Writing K-quants here would mean re-implementing llama.cpp's
per-tensor mixes and its importance-matrix search; instead :mod:`mlx_lora.gguf.writer` writes the
f16 (or
f32, for a float32 model) GGUF it already verifies, and llama.cpp's ``llama_model_quantize`` — the
code ``llama-quantize`` and ``ollama create -q`` run — turns it into the type asked for, through
llama-cpp-python (the ``export``/``verify`` extra, imported only here and only when asked for).

Which type is written how is one table, :data:`mlx_lora.gguf.writer.GGUF_EXPORT_TYPES`. llama.cpp
falls
back to another type for a matrix whose rows do not split into the type's blocks (256 values for
K-quants: q4_K → q5_0, q6_K → q8_0, and f16 when even 32 does not divide): a model with a hidden
size of 64 gets no K-quant at all. The fallbacks are read from llama.cpp's log and the types
actually written are read back from the file, so the export says what it really contains.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.core.dtypes import config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_file, read_json, scratch_file
from mlx_lora.gguf.llamacpp import have_llama_cpp, llama_quantize
from mlx_lora.gguf.writer import GGUF_EXPORT_TYPES, LLAMA_CPP_TYPES, write_gguf

INSTALL_HINT = 'pip install "mlx_lora[export]"'


def normalize_type(gguf_type: str) -> str:
    """``Q4_K_M`` → ``q4_k_m``; an unknown name is a one-line error listing the known ones."""
    key = str(gguf_type).lower()
    if key not in GGUF_EXPORT_TYPES:
        raise MlxLoraError(
            f"unknown --gguf-type {gguf_type!r}; choose {', '.join(GGUF_EXPORT_TYPES)}"
        )
    return key


def made_by_llama_cpp(gguf_type: str) -> bool:
    return normalize_type(gguf_type) in LLAMA_CPP_TYPES


def require_quantizer(gguf_type: str) -> None:
    """Fail before any work when the type needs llama.cpp and llama-cpp-python is missing."""
    if made_by_llama_cpp(gguf_type) and not have_llama_cpp():
        raise MlxLoraError(
            f"--gguf-type {gguf_type} is made by llama.cpp's quantizer, which needs "
            f"llama-cpp-python: {INSTALL_HINT} (or pick f16, bf16, f32 or q8_0)"
        )


def reference_type(hf_dir: Path) -> str:
    """The type quantization starts from: f32 for a float32 folder (nothing to lose), else f16."""
    config = read_json(Path(hf_dir) / "config.json")
    dtype = config_dtype(config, "")
    return "f32" if dtype == "float32" else "f16"


def type_name(gguf_type: str) -> str:
    """The spelling of llama-quantize's list: q4_k_m → Q4_K_M (our writer's types stay lower)."""
    return gguf_type.upper() if gguf_type in LLAMA_CPP_TYPES else gguf_type


# ------------------------------------------------------------------------- importance matrix


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An importance matrix written by ``llama-imatrix``: GGUF (``NAME.in_sum2`` / ``NAME.counts``,
    the current format) or the legacy ``.dat``. Returns GGUF tensor name → per-column weights, the
    values llama-quantize would pass (sums divided by counts)."""
    path = Path(path)
    if not path.is_file():
        raise MlxLoraError(f"--imatrix {path} does not exist; pass a file written by llama-imatrix")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        data = _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise MlxLoraError(
            f"--imatrix {path} is not an importance matrix llama.cpp can read ({e}); "
            "write it with llama-imatrix"
        ) from None
    if not data:
        raise MlxLoraError(f"--imatrix {path} holds no entries; write it with llama-imatrix")
    bad = [k for k, v in data.items() if not np.all(np.isfinite(v))]
    if bad:
        raise MlxLoraError(f"--imatrix {path}: entry {bad[0]} holds NaN or infinite values")
    return data


def _read_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.array(t.data, dtype=np.float32)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.array(t.data, dtype=np.float32)
    out = {}
    for name, s in sums.items():
        if name not in counts:
            raise ValueError(f"{name}.in_sum2 has no {name}.counts")
        s = s.reshape(-1, s.shape[-1])  # [matrices, columns]
        c = counts[name].reshape(-1)
        e = np.ones_like(s)
        seen = c > 0
        e[seen] = s[seen] / c[seen, None]
        out[name] = e.reshape(-1)
    return out


def _read_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    """int32 count; per entry: int32 name length, name, int32 calls, int32 values, float32s."""
    raw = path.read_bytes()

    def ints(pos: int, n: int) -> list[int]:
        return [int(x) for x in np.frombuffer(raw, dtype="<i4", count=n, offset=pos)]

    (n,), pos, out = ints(0, 1), 4, {}
    if n < 1 or n > 1_000_000:
        raise ValueError(f"{n} entries")
    for _ in range(n):
        (length,) = ints(pos, 1)
        name = raw[pos + 4 : pos + 4 + length].decode("utf-8")
        ncall, nval = ints(pos + 4 + length, 2)
        pos += 12 + length
        if nval < 1:
            raise ValueError(f"entry {name} has {nval} values")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = values / ncall if ncall > 0 else values
    return out


# ------------------------------------------------------------------------------ quantizing


# GGUF metadata value types → byte size (8: string, 9: array; see the GGUF spec)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensors(path: Path) -> list[tuple[str, str, int, int]]:
    """(name, type, elements, bytes) of every tensor in a GGUF, from its header alone.

    ``gguf.GGUFReader`` parses every metadata field into numpy views first, which takes tens of
    seconds for a 150k-token vocabulary; this skips the metadata and reads only the tensor list.
    """
    import gguf

    with open(path, "rb") as f:
        raw = f.read(1 << 20)
        pos = 24

        def need(n: int) -> None:
            nonlocal raw
            while pos + n > len(raw):
                more = f.read(max(1 << 20, n))
                if not more:
                    raise ValueError(f"{path} ends inside its header")
                raw += more

        def u(n_bytes: int) -> int:
            nonlocal pos
            need(n_bytes)
            v = int.from_bytes(raw[pos : pos + n_bytes], "little")
            pos += n_bytes
            return v

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                n = u(8)
                need(n)
                pos += n
            elif vtype == 9:
                item, count = u(4), u(8)
                if item in _SCALAR_SIZE:
                    need(count * _SCALAR_SIZE[item])
                    pos += count * _SCALAR_SIZE[item]
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                need(_SCALAR_SIZE[vtype])
                pos += _SCALAR_SIZE[vtype]

        need(24)
        if raw[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        n_tensors, n_kv = (int.from_bytes(raw[8 + 8 * i : 16 + 8 * i], "little") for i in (0, 1))
        for _ in range(n_kv):
            skip_value(8)  # the key
            skip_value(u(4))
        out = []
        for _ in range(n_tensors):
            n = u(8)
            need(n)
            name = raw[pos : pos + n].decode("utf-8")
            pos += n
            dims = [u(8) for _ in range(u(4))]
            qtype = gguf.GGMLQuantizationType(u(4))
            u(8)  # offset
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            elements = math.prod(dims)
            out.append((name, qtype.name.lower(), elements, elements // block * size))
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """Type name → number of tensors, read back from a GGUF file (what it really holds)."""
    return dict(Counter(t for _, t, _, _ in gguf_tensors(path)).most_common())


def bits_per_weight(path: Path) -> float:
    """Bits per weight of a GGUF's tensors (metadata excluded)."""
    infos = gguf_tensors(path)
    return 8 * sum(b for *_, b in infos) / max(1, sum(n for _, _, n, _ in infos))


def _fallback_note(fallbacks: list[dict]) -> str | None:
    if not fallbacks:
        return None
    used = Counter(f"{f['wanted']}→{f['used']}" for f in fallbacks)
    cols = sorted({f["ncols"] for f in fallbacks})
    blocks = sorted({f["block"] for f in fallbacks})
    return (
        f"{len(fallbacks)} tensor(s) have rows of {', '.join(map(str, cols))} values, which do not "
        f"split into blocks of {', '.join(map(str, blocks))}: llama.cpp used "
        + ", ".join(f"{k} ×{n}" for k, n in used.most_common())
    )


def quantize_gguf(
    src: Path,
    dst: Path,
    gguf_type: str,
    *,
    imatrix: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``src`` (an f16/f32 GGUF) → ``dst`` in ``gguf_type`` by llama.cpp, atomically, with a
    progress bar over the tensors. Returns what happened (for ``export.json``)."""
    from tqdm import tqdm

    gguf_type = normalize_type(gguf_type)
    require_quantizer(gguf_type)
    weights = read_imatrix(imatrix) if imatrix is not None else None
    bar = tqdm(
        total=0,
        unit="tensor",
        desc=f"{type_name(gguf_type)} {Path(dst).name}",
        disable=not progress,
    )

    def on_tensor(i: int, n: int, name: str) -> None:
        if bar.total != n:
            bar.reset(total=n)
        bar.n = i - 1
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    t = time.perf_counter()
    try:
        with atomic_file(Path(dst)) as tmp:
            log = llama_quantize(
                src,
                tmp,
                int(GGUF_EXPORT_TYPES[gguf_type][1]),
                imatrix=weights,
                on_tensor=on_tensor,
            )
    finally:
        bar.close()
    return {
        "quantizer": f"llama.cpp llama_model_quantize (llama-cpp-python {_llama_cpp_version()})",
        "imatrix": str(Path(imatrix).resolve()) if imatrix is not None else None,
        "imatrix_entries": len(weights) if weights else 0,
        "tensor_types": tensor_types(dst),
        "fallbacks": log.fallbacks,
        "fallback_note": _fallback_note(log.fallbacks),
        "seconds": round(time.perf_counter() - t, 2),
    }


def _llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - the version is only a label
        return "?"


def write_quantized_gguf(
    hf_dir: Path,
    dst: Path,
    gguf_type: str,
    *,
    progress: bool = True,
    name: str | None = None,
    imatrix: Path | None = None,
    reference: Path | None = None,
) -> dict[str, Any]:
    """The HF folder → ``dst`` in a llama.cpp type: our writer's f16/f32 GGUF first (at
    ``reference`` when the caller keeps it, e.g. for verify; else a scratch file), then llama.cpp.
    """
    ref_type = reference_type(hf_dir)
    if reference is not None:
        write_gguf(hf_dir, reference, ref_type, progress=progress, name=name)
        info = quantize_gguf(reference, dst, gguf_type, imatrix=imatrix, progress=progress)
    else:
        with scratch_file(Path(dst), ref_type) as scratch:
            write_gguf(hf_dir, scratch, ref_type, progress=progress, name=name)
            info = quantize_gguf(scratch, dst, gguf_type, imatrix=imatrix, progress=progress)
    return {"from": ref_type, **info}
