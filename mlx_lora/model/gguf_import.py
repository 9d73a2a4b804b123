"""A GGUF file (or an Ollama model) as the base model: converted once into a cached HF folder.

People who run models in Ollama or llama.cpp have GGUF files, often quantized, and no Hugging
Face download. ``--model model.gguf`` and ``--model ollama:NAME[:TAG]`` make that file a base
model for every command: it is converted once into a Hugging Face folder (the reverse of
:mod:`mlx_lora.gguf.writer`) under ``$MLX_LORA_CACHE/gguf/<key>`` (default ``~/.cache/mlx_lora``),
keyed
by the file's content hash (an Ollama blob is already named by its sha256), and reused.

- Weights are dequantized with ``gguf.quants`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants …)
  into safetensors with Hugging Face names (``gguf``'s tensor-name map read backwards), a chunk
  of rows at a time. Quantized sources become bf16; float sources keep their precision (an F32
  file whose values are all bf16-exact is written as bf16, so HF → GGUF f32 → HF is lossless).
- llama.cpp's converter permutes llama q/k rows from HF's rotate-half RoPE layout to the
  interleaved one; the permutation is undone here. qwen2 uses NeoX RoPE and needs none.
- ``config.json`` comes from the ``{arch}.*`` hyperparameters (a llama3 ``rope_freqs`` tensor is
  turned back into its ``rope_scaling``), the tokenizer from ``tokenizer.*``
  (:mod:`mlx_lora.model.gguf_tokenizer`), ``generation_config.json`` from the end-token ids and
  ``general.sampling.*``.
- The folder is written under a temporary name and renamed when complete, under a lock: a killed
  conversion leaves nothing a later run trusts (its leftovers are removed by the next one).
- Nothing of a file is trusted unchecked (:mod:`mlx_lora.model.gguf_check`): its header's counts
  are held against the file before ``gguf.GGUFReader`` allocates for them, its hyper-parameters
  against each other and against every tensor's shape before anything is built per block.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mlx_lora.core.dtypes import CONFIG_KEY, SAFETENSORS_CODES
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_dir, read_json, remove_temporaries, write_json_atomic
from mlx_lora.core.weights import INDEX_FILE, StreamedTensor, save_streamed
from mlx_lora.model.families import FAMILIES
from mlx_lora.model.gguf_check import (
    check_blocks,
    check_header,
    check_tensors,
    hparams,
    positive,
    whole,
)
from mlx_lora.model.gguf_tokenizer import build_tokenizer, end_token_ids, special_ids
from mlx_lora.model.meta import GENERATION_CONFIG, sampling_generation_config

IMPORT_VERSION = 1  # bump when the produced folder changes: old cache entries are then ignored
SOURCE_RECORD = "gguf_source.json"
OLLAMA_PREFIX = "ollama:"

# GGUF architecture → (HF architectures entry, model_type) of the config.json written for it
SUPPORTED: dict[str, tuple[str, str]] = {
    name: (f.hf_architectures[0], f.model_types[0]) for name, f in FAMILIES.items() if f.gguf_import
}
_QT = gguf.GGMLQuantizationType
_FLOATS = {_QT.F32, _QT.F16, _QT.BF16}
_CHUNK_ELEMENTS = 1 << 22  # dequantize ~16 MB of f32 at a time
_SHARD_BYTES = 5_000_000_000  # Hugging Face's default shard size


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A memory-mapped reader, or one line saying why the file is not a usable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise MlxLoraError(f"{path} does not exist; pass the path of a .gguf file")
    check_header(path)  # counts the reader would trust (and allocate for) are checked first
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many types on bad input
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "cannot reshape" in msg:
            raise MlxLoraError(
                f"{path}: tensor data is short (the file is truncated); download it again"
            ) from None
        if "GGMLQuantizationType" in msg:
            raise MlxLoraError(
                f"{path}: a tensor uses an unknown quantization type ({msg}); this gguf package "
                "cannot read it: use a file quantized to a common type (Q4_K_M, Q8_0, F16)"
            ) from None
        raise MlxLoraError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {msg}); it is truncated or "
            "corrupt: download it again"
        ) from None


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value pairs of a GGUF as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def import_tokenizer(gguf_path: Path, out_dir: Path) -> Path:
    """Write only the tokenizer files of ``gguf_path`` into ``out_dir`` (tokenizer tests)."""
    meta = metadata(open_gguf(gguf_path))
    tok_json, tok_config = build_tokenizer(meta, str(gguf_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "tokenizer.json", tok_json)
    write_json_atomic(out_dir / "tokenizer_config.json", tok_config)
    return out_dir


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    hf_name: str
    src: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # numpy order
    rows: np.ndarray | None  # GGUF row for each HF row (undoes llama's q/k permutation)

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return self.src.tensor_type


def _hf_names(arch: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor base name → HF module name, from ``gguf``'s (HF → GGUF) name map."""
    tmap = gguf.get_tensor_name_map(FAMILIES[arch].arch, n_layers)
    out: dict[str, str] = {}
    for hf, (_, gname) in tmap.mapping.items():
        # the map lists many spellings; the first model./lm_head one is transformers' own
        if hf.startswith(("model.", "lm_head")) and gname not in out:
            out[gname] = hf
    return out


def _llama_inverse_rows(n_rows: int, n_head: int) -> np.ndarray:
    """GGUF row for each HF row: llama.cpp stores pair members of each head interleaved
    (view (heads, half, 2)); HF stores first halves, then second halves (view (heads, 2, half))."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(n_rows)


def _plan_tensors(
    reader: gguf.GGUFReader, arch: str, hp: dict, meta: dict, source: str
) -> list[_Tensor]:
    """Every tensor under its HF name, checked against the metadata before any is read."""
    check_blocks([t.name for t in reader.tensors], arch, hp["num_hidden_layers"], source)
    names = _hf_names(arch, hp["num_hidden_layers"])
    shapes = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        parts = base.split(".")
        known = base in ("token_embd", "output_norm", "output", "rope_freqs") or (
            len(parts) == 3 and parts[0] == "blk" and parts[2] in FAMILIES[arch].block
        )
        unmapped = base not in names and base != "rope_freqs"
        if not known or unmapped or suffix not in ("weight", "bias"):
            raise MlxLoraError(
                f"{source}: tensor {t.name!r} has no Hugging Face counterpart for {arch}; this "
                "model variant is not supported"
            )
        shapes[t.name] = tuple(int(d) for d in reversed(t.shape.tolist()))
    check_tensors(shapes, hp, len(meta["tokenizer.ggml.tokens"]), meta, arch, source)
    plans = []
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if base == "rope_freqs":
            continue  # becomes rope_scaling in config.json
        _check_dequantizable(t, source)
        shape, part = shapes[t.name], base.rsplit(".", 1)[-1]
        rows = None
        if FAMILIES[arch].rope_permute and part in ("attn_q", "attn_k"):
            heads = hp["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
            rows = _llama_inverse_rows(shape[0], heads)
        plans.append(_Tensor(f"{names[base]}.{suffix}", t, shape, rows))
    missing = _missing(plans, hp)
    if missing:
        raise MlxLoraError(
            f"{source}: tensors for {', '.join(missing[:4])} are missing; the file is incomplete"
        )
    return plans


def _check_dequantizable(t: Any, source: str) -> None:
    """Try one row: the gguf package has no dequantizer for every type llama.cpp knows."""
    row = np.asarray(t.data if t.data.ndim == 1 else t.data[:1])
    try:
        gguf.quants.dequantize(row, t.tensor_type)
    except NotImplementedError:
        raise MlxLoraError(
            f"{source}: tensor {t.name} uses {t.tensor_type.name}, which this gguf package cannot "
            "dequantize; use a file quantized to a common type (Q4_K_M, Q8_0, F16)"
        ) from None


def _missing(plans: list[_Tensor], hp: dict) -> list[str]:
    have = {p.hf_name for p in plans}
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    for b in range(hp["num_hidden_layers"]):
        need += [f"model.layers.{b}.{n}.weight" for n in per_layer]
    return [n for n in need if n not in have]


def _load_rows(t: _Tensor, start: int, stop: int) -> np.ndarray:
    """HF rows ``start:stop`` of a tensor as float32 (quantized blocks never cross rows)."""
    data = t.src.data
    if len(t.shape) == 1:
        return gguf.quants.dequantize(np.asarray(data), t.qtype).reshape(t.shape)
    raw = data[start:stop] if t.rows is None else data[t.rows[start:stop]]
    return gguf.quants.dequantize(np.asarray(raw), t.qtype).reshape((stop - start, *t.shape[1:]))


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), _QT.BF16).tobytes()
    return np.ascontiguousarray(x, np.float16 if dtype == "float16" else np.float32).tobytes()


def _chunks(t: _Tensor) -> Iterator[tuple[int, int]]:
    if len(t.shape) < 2:
        yield 0, 1
        return
    per_row = max(1, math.prod(t.shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, t.shape[0], step):
        yield start, min(start + step, t.shape[0])


def _bf16_exact(plans: list[_Tensor]) -> bool:
    """Every value of these F32 tensors survives bf16 (the file came from a bf16 model)."""
    for p in plans:
        bits = np.asarray(p.src.data).view(np.uint32)
        for start in range(0, bits.size, _CHUNK_ELEMENTS):
            if np.any(bits.reshape(-1)[start : start + _CHUNK_ELEMENTS] & 0xFFFF):
                return False
    return True


def _output_dtype(plans: list[_Tensor]) -> str:
    """bf16 for quantized sources; float sources keep their precision."""
    kinds = {p.qtype for p in plans if len(p.shape) > 1}
    if not kinds <= _FLOATS:
        return "bfloat16"
    if kinds == {_QT.F16}:
        return "float16"
    if kinds == {_QT.BF16}:
        return "bfloat16"
    all_f32 = all(p.qtype == _QT.F32 for p in plans)
    return "bfloat16" if all_f32 and _bf16_exact(plans) else "float32"


def _write_safetensors(plans: list[_Tensor], out_dir: Path, dtype: str, progress: bool) -> None:
    """Shards of at most ~5 GB, each written tensor by tensor (memory ~ one chunk of rows)."""
    from tqdm import tqdm

    bar = tqdm(
        total=sum(math.prod(p.shape) for p in plans),
        unit="w",
        unit_scale=True,
        desc="dequantize",
        disable=not progress,
    )

    def streamed(p: _Tensor) -> StreamedTensor:
        def chunks() -> Iterator[bytes]:
            for start, stop in _chunks(p):
                rows = _load_rows(p, start, stop)
                bar.update(rows.size)
                yield _encode(rows, dtype)

        return StreamedTensor(p.hf_name, SAFETENSORS_CODES[dtype], p.shape, chunks)

    shards: list[list[StreamedTensor]] = [[]]
    size = 0
    for t in map(streamed, plans):
        if shards[-1] and size + t.nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [
        "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for i in range(n)
    ]
    with bar:
        for name, shard in zip(names, shards, strict=True):
            save_streamed(out_dir / name, shard)
    if n > 1:
        weight_map = {t.name: name for name, s in zip(names, shards, strict=True) for t in s}
        total = sum(t.nbytes for s in shards for t in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json_atomic(out_dir / INDEX_FILE, index)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """``rope_scaling`` (rope_type llama3) that reproduces llama.cpp's ``rope_freqs`` divisors.

    The divisors depend on ``original_max_position_embeddings / wavelength`` only through
    ``a = old_ctx / (high - low)`` and ``b = low / (high - low)`` (linear in the smooth band), so
    old_ctx is fixed at Llama 3's 8192 and low/high are solved from the band.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    old_ctx = 8192.0
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wave = freqs / (2 * math.pi)
    band = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6 * factor)
    if band.sum() >= 2 and factor > 1:
        # divisor d = 1 / ((1 - s) / factor + s) with s = (old_ctx / wavelength - low) / width
        smooth = (factor / factors[band] - 1.0) / (factor - 1.0)
        slope, intercept = np.polyfit(inv_wave[band] * old_ctx, smooth, 1)
        width = 1.0 / slope
        low = -intercept * width
        high = low + width
    else:  # no smooth band: any split point between the two regimes reproduces the divisors
        low, high = 1.0, 4.0
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(old_ctx),
    }


def _rope_scaling(
    meta: dict, arch: str, reader: gguf.GGUFReader, hp: dict, source: str
) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    key = next(
        (k for k in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear") if meta.get(k)),
        None,
    )
    factor = positive(meta, key, source, 1.0) if key else None
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        divisors = gguf.quants.dequantize(np.asarray(freqs.data), freqs.tensor_type)
        return llama3_rope_scaling(divisors.reshape(-1), hp["head_dim"], hp["rope_theta"])
    if kind in (None, "none") and not factor:
        return None
    if kind in ("linear", None):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = whole(meta, f"{arch}.rope.scaling.original_context_length", source, None)
        out = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        if orig:
            out["original_max_position_embeddings"] = orig
        return out
    raise MlxLoraError(
        f"{source}: rope scaling type {kind!r} is not supported (linear, yarn, llama3)"
    )


def hf_config(
    meta: dict,
    arch: str,
    reader: gguf.GGUFReader,
    plans: list[_Tensor],
    dtype: str,
    hp: dict,
    source: str,
) -> dict:
    """config.json for transformers / mlx-lm from the GGUF's hyperparameters."""
    names = {p.hf_name for p in plans}
    n_vocab = next(p.shape[0] for p in plans if p.hf_name == "model.embed_tokens.weight")
    ids = special_ids(meta, len(meta.get("tokenizer.ggml.tokens") or []))
    hf_arch, model_type = SUPPORTED[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        **hp,
        "hidden_act": "silu",
        "rope_scaling": _rope_scaling(meta, arch, reader, hp, source),
        "tie_word_embeddings": "lm_head.weight" not in names,
        "vocab_size": n_vocab,
        CONFIG_KEY: dtype,
        "use_cache": True,
    }
    if arch == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in names
        config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in names
    else:
        config.update(use_sliding_window=False, max_window_layers=hp["num_hidden_layers"])
    for name in ("bos", "eos"):  # every end token goes to generation_config.json
        if name in ids:
            config[f"{name}_token_id"] = ids[name]
    return config


def generation_config(meta: dict) -> dict:
    """End tokens and llama.cpp's ``general.sampling.*`` advice, in transformers' names."""
    out: dict[str, Any] = {}
    ids = special_ids(meta, len(meta.get("tokenizer.ggml.tokens") or []))
    if "bos" in ids:
        out["bos_token_id"] = ids["bos"]
    ends = end_token_ids(meta)
    if ends:
        out["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    if "pad" in ids:
        out["pad_token_id"] = ids["pad"]
    names = {
        "temp": "temperature",
        "top_k": "top_k",
        "top_p": "top_p",
        "min_p": "min_p",
        "penalty_repeat": "repetition_penalty",
    }
    sampling = {
        name: v
        for key, name in names.items()
        if isinstance(v := meta.get(f"general.sampling.{key}"), int | float)
        and not isinstance(v, bool)
    }
    return {**out, **sampling_generation_config(sampling)}


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def quantization_name(meta: dict, plans: list[_Tensor]) -> str | None:
    """The source's quantization (e.g. "Q4_1", "Q4_K_M"), None for a float file."""
    quantized = Counter(p.qtype.name for p in plans if p.qtype not in _FLOATS)
    if not quantized:
        return None
    ftype = meta.get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(ftype)).name
    except (TypeError, ValueError):
        name = ""
    if name.startswith("MOSTLY_"):
        return name.removeprefix("MOSTLY_")
    return quantized.most_common(1)[0][0]


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, progress: bool = False, note: str | None = None
) -> dict:
    """Write the Hugging Face folder of ``gguf_path`` into the (empty) folder ``out_dir``.

    Everything a bad file can fail on is checked before anything is written; then ``note`` (if
    any) is printed. Returns the record also saved as ``gguf_source.json``.
    """
    t0 = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    source = str(gguf_path)
    reader = open_gguf(gguf_path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED:
        raise MlxLoraError(
            f"{source}: architecture {arch!r} is not supported as a base model; supported: "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    tok_json, tok_config = build_tokenizer(meta, source)
    hp = hparams(meta, arch, source)
    plans = _plan_tensors(reader, arch, hp, meta, source)
    _check_sizes(reader, gguf_path)
    dtype = _output_dtype(plans)
    config = hf_config(meta, arch, reader, plans, dtype, hp, source)
    if note:
        print(note, file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(plans, out_dir, dtype, progress)
    write_json_atomic(out_dir / "config.json", config)
    write_json_atomic(out_dir / GENERATION_CONFIG, generation_config(meta))
    write_json_atomic(out_dir / "tokenizer.json", tok_json)
    write_json_atomic(out_dir / "tokenizer_config.json", tok_config)
    record = {
        "source": str(gguf_path.resolve()),
        "name": meta.get("general.name"),
        "architecture": arch,
        "quantization": quantization_name(meta, plans),
        "tensor_types": dict(Counter(p.qtype.name for p in plans)),
        "dtype": dtype,
        "importer_version": IMPORT_VERSION,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(out_dir / SOURCE_RECORD, record)  # last: its presence marks a whole folder
    return record


def _check_sizes(reader: gguf.GGUFReader, path: Path) -> None:
    """Tensor data must lie inside the file (the reader maps a short file without complaint)."""
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise MlxLoraError(
                f"{path}: tensor data of {t.name} is short (file truncated at {size} bytes); "
                "download the file again"
            )


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("MLX_LORA_CACHE") or Path.home() / ".cache" / "mlx_lora"
    return Path(base).expanduser() / "gguf"


def file_sha256(path: Path) -> str:
    """The content hash of ``path``, remembered per (path, size, mtime) so it is computed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_path = cache_root() / "hashes.json"
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    try:
        memo = read_json(memo_path)
    except MlxLoraError:  # a damaged memo is only a cache: start a new one
        memo = {}
    hit = memo.get(str(path))
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo_path, memo)
    return digest


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def import_gguf(gguf_path: Path, *, key: str | None = None, progress: bool = True) -> Path:
    """The cached Hugging Face folder of ``gguf_path``, converting it on first use.

    ``key`` identifies the content (an Ollama blob's sha256); by default the file is hashed.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MlxLoraError(f"{gguf_path} does not exist; pass the path of a .gguf file")
    key = key or file_sha256(gguf_path)
    root = cache_root()
    final = root / f"{key[:32]}-v{IMPORT_VERSION}"
    if (final / SOURCE_RECORD).is_file():
        return final
    with _locked(root, final.name):
        if (final / SOURCE_RECORD).is_file():
            return final  # another process converted it meanwhile
        remove_temporaries(final)  # a killed conversion's leftovers
        if final.exists():  # incomplete (no record): not trusted
            shutil.rmtree(final)
        mb = gguf_path.stat().st_size / 1e6
        note = (
            f"converting {gguf_path.name} ({mb:,.0f} MB) into a Hugging Face folder, once: {final}"
            if progress
            else None
        )
        with atomic_dir(final) as tmp:
            convert_gguf(gguf_path, tmp, progress=progress, note=note)
    return final


_ANNOUNCED: set[str] = set()


def announce_quantization(folder: Path) -> None:
    """Say once per process that a fine-tune of a quantized file starts from its quality."""
    try:
        record = read_json(Path(folder) / SOURCE_RECORD)
    except MlxLoraError:
        return
    quant = record.get("quantization")
    if quant and str(folder) not in _ANNOUNCED:
        _ANNOUNCED.add(str(folder))
        print(
            f"weights dequantized from {quant}: the fine-tune starts from the quantized model's "
            "quality",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------------------------

_OLLAMA_HOST, _OLLAMA_NAMESPACE, _OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
_MODEL_LAYER = "application/vnd.ollama.image.model"
_ADAPTER_LAYER = "application/vnd.ollama.image.adapter"


def ollama_models_dir() -> Path:
    """Where Ollama keeps manifests/ and blobs/: $OLLAMA_MODELS or ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def _parse_ollama_name(name: str) -> tuple[str, str, str, str]:
    """[host/][namespace/]model[:tag] with Ollama's defaults, as (host, namespace, model, tag)."""
    tag = _OLLAMA_TAG
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    parts = name.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else _OLLAMA_NAMESPACE
    host = parts[-3] if len(parts) >= 3 else _OLLAMA_HOST
    return host, namespace, model, tag


def installed_ollama_models(root: Path) -> list[str]:
    """Installed models, spelled the short way ``ollama list`` does."""
    out = []
    for p in sorted((root / "manifests").glob("*/*/*/*")):
        if not p.is_file():
            continue
        host, namespace, model, tag = p.relative_to(root / "manifests").parts
        prefix = (
            ""
            if (host, namespace) == (_OLLAMA_HOST, _OLLAMA_NAMESPACE)
            else f"{namespace}/"
            if host == _OLLAMA_HOST
            else f"{host}/{namespace}/"
        )
        out.append(f"{prefix}{model}:{tag}")
    return out


def ollama_blob(name: str) -> tuple[Path, str]:
    """(GGUF blob path, its sha256) of an installed Ollama model ``NAME[:TAG]``."""
    root = ollama_models_dir()
    if not (root / "manifests").is_dir():
        raise MlxLoraError(
            f"no Ollama models folder at {root} (no manifests/); install Ollama and run "
            f"`ollama pull {name}`, or set OLLAMA_MODELS to its models folder"
        )
    parts = _parse_ollama_name(name)
    manifest = root / "manifests" / Path(*parts)
    if not manifest.is_file():
        wanted = [p.lower() for p in parts]
        manifest = next(  # Ollama compares names case-insensitively
            (
                p
                for p in (root / "manifests").glob("*/*/*/*")
                if [x.lower() for x in p.relative_to(root / "manifests").parts] == wanted
            ),
            manifest,
        )
    if not manifest.is_file():
        have = installed_ollama_models(root)
        listed = ", ".join(have) if have else "none"
        raise MlxLoraError(
            f"Ollama model {name!r} is not installed in {root} (installed: {listed}); run "
            f"`ollama pull {name}`"
        )
    layers = read_json(manifest).get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise MlxLoraError(f"{manifest}: an Ollama manifest without layers; re-pull the model")
    kinds = [layer.get("mediaType") for layer in layers]
    if _ADAPTER_LAYER in kinds:
        raise MlxLoraError(
            f"Ollama model {name!r} carries an ADAPTER layer; use its base model as --model"
        )
    model = next((layer for layer in layers if layer.get("mediaType") == _MODEL_LAYER), None)
    if model is None:
        raise MlxLoraError(
            f"Ollama model {name!r} has no GGUF model layer ({_MODEL_LAYER}); it cannot be "
            "used as a base model"
        )
    digest = str(model.get("digest", ""))
    hexdigest = digest.removeprefix("sha256:")
    blob = root / "blobs" / f"sha256-{hexdigest}"
    if len(hexdigest) != 64 or not blob.is_file():
        raise MlxLoraError(
            f"Ollama model {name!r}: its weights blob {blob} is missing; run `ollama pull {name}`"
        )
    return blob, hexdigest


def is_gguf_model(model: str) -> bool:
    """``--model`` names a GGUF file or an Ollama model rather than a folder or hub id."""
    return model.startswith(OLLAMA_PREFIX) or model.lower().endswith(".gguf")


def resolve_gguf_model(model: str, *, progress: bool = True) -> Path:
    """``model.gguf`` or ``ollama:NAME[:TAG]`` → its cached Hugging Face folder."""
    if model.startswith(OLLAMA_PREFIX):
        name = model[len(OLLAMA_PREFIX) :]
        if not name:
            raise MlxLoraError("ollama: needs a model name, e.g. --model ollama:qwen2.5:0.5b")
        path, key = ollama_blob(name)
    else:
        path, key = Path(model).expanduser(), None
        if not path.is_file():
            raise MlxLoraError(f"{path} does not exist; pass the path of a .gguf file")
    folder = import_gguf(path, key=key, progress=progress)
    announce_quantization(folder)
    return folder
