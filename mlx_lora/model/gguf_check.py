"""What a GGUF must pass before the importer trusts it: its header's counts, then its numbers.

A GGUF header is a chain of counts (tensors, key/value pairs, array entries, string lengths) that
``gguf.GGUFReader`` believes as it goes: it keeps several hundred bytes of numpy views per array
entry and walks past the end of the file on empty views, so a file claiming 2^40 entries runs
for hours into a MemoryError. :func:`check_header` walks the same bytes first on a memory map
(integer reads only; a numeric array is stepped over in one move) and refuses a count the file
cannot hold or no model has. :func:`hparams` and :func:`check_tensors` then hold the ``{arch}.*``
hyper-parameters against each other and against the tensors' shapes, so a damaged number is one
line naming the file and the key, not a traceback (a zero head count) or a conversion that
builds the names of ten million layers.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mlx_lora.core.errors import MlxLoraError

MAX_TENSORS = 1 << 16  # a 671B MoE file has ~1,100; the reader keeps a few KB per tensor
MAX_KEYS = 1 << 16  # key/value pairs (real files: ~40)
MAX_ENTRIES = 1 << 22  # array entries in all (a 262k-token vocabulary has ~0.8M)
MAX_COUNT = (1 << 32) - 1  # llama.cpp reads every count of the model as a uint32
_MAX_NESTING = 3  # arrays of arrays
_MAX_DIMS = 4  # GGML_MAX_DIMS
_VERSIONS = (2, 3)  # what gguf.GGUFReader reads
_V = gguf.GGUFValueType
_FIXED = {
    _V.UINT8: 1,
    _V.INT8: 1,
    _V.BOOL: 1,
    _V.UINT16: 2,
    _V.INT16: 2,
    _V.UINT32: 4,
    _V.INT32: 4,
    _V.FLOAT32: 4,
    _V.UINT64: 8,
    _V.INT64: 8,
    _V.FLOAT64: 8,
}
_AGAIN = "the file is damaged: download it again"
_EPS = "attention.layer_norm_rms_epsilon"


# --------------------------------------------------------------------------------------------
# the header
# --------------------------------------------------------------------------------------------


class _Cursor:
    """Integers and byte runs from a memory-mapped file, never past its end."""

    def __init__(self, buf: mmap.mmap, path: Path, order: str) -> None:
        self.buf, self.path, self.order, self.pos = buf, path, order, 0
        self.entries = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left:
            raise MlxLoraError(
                f"{self.path}: not a readable GGUF file: {what} runs past the end of the file "
                f"({len(self.buf):,} bytes); it is truncated or corrupt: download it again"
            )
        self.pos += n
        return self.pos - n

    def uint(self, n: int, what: str) -> int:
        at = self.skip(n, what)
        return int.from_bytes(self.buf[at : at + n], self.order)

    def text(self, what: str) -> str:
        n = self.uint(8, f"the length of {what}")
        at = self.skip(n, what)
        return self.buf[at : at + n].decode("utf-8", "replace")

    def claims(self, key: str, count: int, each: int) -> None:
        """Refuse an array that claims more entries than the rest of the file or any model has."""
        if count * each > self.left:
            raise MlxLoraError(
                f"{self.path}: metadata {key} claims {count:,} entries, more than the "
                f"{self.left:,} bytes left in the file can hold; {_AGAIN}"
            )
        self.entries += count
        if self.entries > MAX_ENTRIES:
            raise MlxLoraError(
                f"{self.path}: metadata {key} brings the array entries to {self.entries:,}, more "
                f"than any model's vocabulary needs (at most {MAX_ENTRIES:,}); {_AGAIN}"
            )


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    """Step over one value of type ``vtype`` (an array entry by entry only for strings)."""
    if vtype in _FIXED:
        cur.skip(_FIXED[vtype], key)
    elif vtype == _V.STRING:
        cur.skip(cur.uint(8, key), key)
    elif vtype == _V.ARRAY:
        etype, count = cur.uint(4, key), cur.uint(8, key)
        if etype in _FIXED:
            cur.claims(key, count, _FIXED[etype])
            cur.skip(count * _FIXED[etype], key)
        elif etype == _V.STRING:
            cur.claims(key, count, 8)
            for _ in range(count):
                cur.skip(cur.uint(8, key), key)
        elif etype == _V.ARRAY and depth < _MAX_NESTING:
            cur.claims(key, count, 12)
            for _ in range(count):
                _value(cur, _V.ARRAY, key, depth + 1)
        else:
            raise MlxLoraError(f"{cur.path}: metadata {key} has entries of type {etype}; {_AGAIN}")
    else:
        raise MlxLoraError(f"{cur.path}: metadata {key} has unknown value type {vtype}; {_AGAIN}")


@dataclass(frozen=True)
class _Info:
    name: str
    dims: tuple[int, ...]
    qtype: int
    offset: int


def _open(path: Path, buf: mmap.mmap) -> tuple[_Cursor, int, int]:
    """The cursor after the fixed part (magic, version, counts) and the two counts."""
    if bytes(buf[:4]) != b"GGUF":
        raise MlxLoraError(f"{path}: not a readable GGUF file (no GGUF magic); {_AGAIN}")
    order = "little" if int.from_bytes(buf[4:8], "little") & 0xFFFF else "big"
    cur = _Cursor(buf, path, order)
    cur.pos = 4
    version = cur.uint(4, "the version")
    if version not in _VERSIONS:
        raise MlxLoraError(
            f"{path}: not a readable GGUF file (version {version}; this gguf package reads "
            f"{' and '.join(map(str, _VERSIONS))}); re-convert it with a current llama.cpp"
        )
    n_tensors, n_keys = cur.uint(8, "the tensor count"), cur.uint(8, "the key count")
    for count, most, what in ((n_tensors, MAX_TENSORS, "tensors"), (n_keys, MAX_KEYS, "keys")):
        if count > most:
            raise MlxLoraError(
                f"{path}: the header claims {count:,} {what}, more than any model has (at most "
                f"{most:,}); {_AGAIN}"
            )
    return cur, n_tensors, n_keys


def _keys(cur: _Cursor, n_keys: int) -> int:
    """Walk the key/value pairs; returns the data alignment (``general.alignment``)."""
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_keys):
        key = cur.text(f"metadata key {i}")
        key = key if len(key) <= 80 else key[:60] + "…"
        vtype = cur.uint(4, f"the type of {key}")
        if key == "general.alignment":
            alignment = cur.uint(4, key) if vtype == _V.UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise MlxLoraError(
                    f"{cur.path}: metadata general.alignment must be a uint32 power of two; "
                    f"{_AGAIN}"
                )
        else:
            _value(cur, vtype, key)
    return alignment


def _tensor_infos(cur: _Cursor, n_tensors: int) -> list[_Info]:
    infos = []
    for i in range(n_tensors):
        name = cur.text(f"the name of tensor {i}")
        if len(name) > 80:  # a damaged count reads key/value bytes as tensor names
            name = name[:60] + "…"
        n_dims = cur.uint(4, f"tensor {name}")
        if n_dims > _MAX_DIMS:
            raise MlxLoraError(
                f"{cur.path}: tensor {i} ({name!r}) claims {n_dims:,} dimensions (GGUF has at "
                f"most {_MAX_DIMS}); {_AGAIN}"
            )
        dims = tuple(cur.uint(8, f"tensor {name}") for _ in range(n_dims))
        infos.append(_Info(name, dims, cur.uint(4, f"tensor {name}"), cur.uint(8, name)))
    return infos


def check_header(path: Path) -> None:
    """Refuse a GGUF whose header claims more than the file holds, before the reader parses it."""
    size = path.stat().st_size
    if size < 24:
        raise MlxLoraError(
            f"{path}: not a readable GGUF file ({size} bytes, shorter than a GGUF header); "
            "it is truncated or corrupt: download it again"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur, n_tensors, n_keys = _open(path, buf)
        alignment = _keys(cur, n_keys)
        infos = _tensor_infos(cur, n_tensors)
        start = -(-cur.pos // alignment) * alignment
    for t in infos:
        try:
            qtype = gguf.GGMLQuantizationType(t.qtype)
        except ValueError:
            raise MlxLoraError(
                f"{path}: tensor {t.name} uses an unknown quantization type ({t.qtype}); this "
                "gguf package cannot read it: use a file quantized to a common type (Q4_K_M, "
                "Q8_0, F16)"
            ) from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if t.dims and t.dims[0] % block:
            raise MlxLoraError(
                f"{path}: tensor {t.name} has rows of {t.dims[0]:,} values, not a multiple of "
                f"{qtype.name}'s block of {block}; {_AGAIN}"
            )
        end = start + t.offset + math.prod(t.dims) * type_size // block
        if end > size:
            raise MlxLoraError(
                f"{path}: tensor data of {t.name} lies past the end of the file (it needs "
                f"{end:,} bytes, the file has {size:,}): it is truncated or damaged; download "
                "it again"
            )


# --------------------------------------------------------------------------------------------
# the model's numbers
# --------------------------------------------------------------------------------------------


_REQUIRED = object()


def whole(meta: dict, key: str, source: str, default: Any = _REQUIRED) -> int:
    """A count of the model (at least 1, at most a uint32), or one line saying what is wrong."""
    v = meta.get(key)
    if v is None:
        if default is _REQUIRED:
            raise MlxLoraError(f"{source}: metadata {key} is missing; the file is damaged")
        return default
    if isinstance(v, list):
        raise MlxLoraError(
            f"{source}: metadata {key} holds {len(v)} values (one per layer); models whose layers "
            "differ are not supported"
        )
    if isinstance(v, bool) or not isinstance(v, int):
        raise MlxLoraError(f"{source}: metadata {key} is {v!r}, not a whole number; {_AGAIN}")
    if not 1 <= v <= MAX_COUNT:
        raise MlxLoraError(
            f"{source}: metadata {key} is {v:,}, outside 1 to {MAX_COUNT:,}; {_AGAIN}"
        )
    return v


def positive(meta: dict, key: str, source: str, default: float) -> float:
    """A positive finite number (a norm epsilon, a RoPE base or factor)."""
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise MlxLoraError(f"{source}: metadata {key} is {v!r}, not a positive number; {_AGAIN}")
    return v


def _f32(value: float) -> float:
    """A GGUF float32 as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def hparams(meta: dict, arch: str, source: str) -> dict:
    """The config.json numbers of ``arch``'s ``{arch}.*`` keys, checked against each other."""

    def count(key: str, default: Any = _REQUIRED) -> int:
        return whole(meta, f"{arch}.{key}", source, default)

    hidden, heads = count("embedding_length"), count("attention.head_count")
    kv = count("attention.head_count_kv", heads)
    if kv > heads or heads % kv:
        raise MlxLoraError(
            f"{source}: metadata {arch}.attention.head_count_kv ({kv}) does not divide "
            f"{arch}.attention.head_count ({heads}); {_AGAIN}"
        )
    key_length = count("attention.key_length", 0)
    head_dim = key_length
    if not key_length or arch == "qwen2":  # Qwen2's head size is always hidden / heads
        head_dim = _even_split(hidden, heads, arch, source)
        if key_length and key_length != head_dim:
            raise MlxLoraError(
                f"{source}: metadata {arch}.attention.key_length ({key_length}) is not "
                f"{arch}.embedding_length / head_count ({head_dim}); {_AGAIN}"
            )
    if count("attention.value_length", head_dim) != head_dim:
        raise MlxLoraError(
            f"{source}: metadata {arch}.attention.value_length differs from the key length "
            f"({head_dim}); heads with different key and value sizes are not supported"
        )
    if head_dim % 2:
        raise MlxLoraError(
            f"{source}: attention heads of {head_dim} dimensions (odd: RoPE rotates pairs); "
            f"{_AGAIN}"
        )
    rope_dim = count("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise MlxLoraError(
            f"{source}: partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported"
        )
    return {
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "max_position_embeddings": count("context_length", 4096),
        "rms_norm_eps": _f32(positive(meta, f"{arch}.{_EPS}", source, 1e-6)),
        "rope_theta": _f32(positive(meta, f"{arch}.rope.freq_base", source, 10000.0)),
    }


def _even_split(hidden: int, heads: int, arch: str, source: str) -> int:
    if hidden % heads:
        raise MlxLoraError(
            f"{source}: metadata {arch}.embedding_length ({hidden}) is not a multiple of "
            f"{arch}.attention.head_count ({heads}) and no attention.key_length is given; {_AGAIN}"
        )
    return hidden // heads


# --------------------------------------------------------------------------------------------
# tensors against the numbers
# --------------------------------------------------------------------------------------------


def check_blocks(names: list[str], arch: str, n_layers: int, source: str) -> None:
    """The ``blk.N`` tensors are those of ``block_count`` blocks (checked before anything is built
    per block: a damaged count would otherwise make the name map of millions of layers)."""
    blocks: set[int] = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "blk":
            if len(parts) < 3 or not parts[1].isascii() or not parts[1].isdigit():
                raise MlxLoraError(f"{source}: tensor {name!r} has no block number; {_AGAIN}")
            blocks.add(int(parts[1]))
    if blocks != set(range(n_layers)):
        last = f" (blk.0 … blk.{max(blocks)})" if blocks else ""
        raise MlxLoraError(
            f"{source}: metadata {arch}.block_count is {n_layers:,} but the file has tensors of "
            f"{len(blocks):,} blocks{last}; {_AGAIN}"
        )


def expected_shape(base: str, suffix: str, hp: dict, vocab: int) -> tuple[int, ...] | None:
    """The HF shape (rows, columns) of GGUF tensor ``base.suffix`` under ``hp``; None: unchecked."""
    d, f, hd = hp["hidden_size"], hp["intermediate_size"], hp["head_dim"]
    q, kv = hp["num_attention_heads"] * hd, hp["num_key_value_heads"] * hd
    table: dict[str, tuple[int, int | None]] = {
        "token_embd": (vocab, d),
        "output": (vocab, d),
        "output_norm": (d, None),
        "rope_freqs": (hd // 2, None),
        "attn_norm": (d, None),
        "ffn_norm": (d, None),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    part = base.rsplit(".", 1)[-1]
    if part not in table:
        return None
    rows, cols = table[part]
    return (rows,) if cols is None or suffix == "bias" else (rows, cols)


def check_tensors(
    shapes: dict[str, tuple[int, ...]], hp: dict, n_tokens: int, meta: dict, arch: str, source: str
) -> int:
    """Every tensor has the shape the metadata says (``shapes``: GGUF name → HF shape); returns
    the vocabulary size (the embedding's rows, which must be the tokenizer's token count)."""
    embed = shapes.get("token_embd.weight")
    if embed is None or len(embed) != 2:
        raise MlxLoraError(f"{source}: token_embd.weight is missing or not a matrix; {_AGAIN}")
    vocab = embed[0]
    if vocab != n_tokens:
        raise MlxLoraError(
            f"{source}: tokenizer.ggml.tokens has {n_tokens:,} tokens but token_embd.weight has "
            f"{vocab:,} rows; {_AGAIN}"
        )
    declared = meta.get(f"{arch}.vocab_size")
    if declared is not None and declared != vocab:
        raise MlxLoraError(
            f"{source}: metadata {arch}.vocab_size is {declared!r} but token_embd.weight has "
            f"{vocab:,} rows; {_AGAIN}"
        )
    for name, shape in shapes.items():
        base, _, suffix = name.rpartition(".")
        want = expected_shape(base, suffix, hp, vocab)
        if want is not None and tuple(shape) != want:
            raise MlxLoraError(
                f"{source}: tensor {name} has shape {list(shape)} but the metadata "
                f"({arch}.embedding_length, head counts, feed_forward_length) says {list(want)}; "
                f"{_AGAIN}"
            )
    return vocab
