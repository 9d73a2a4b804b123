"""Hugging Face folder → GGUF, and PEFT adapter → GGUF LoRA adapter, with the ``gguf`` package only.

The seed runs llama.cpp's converter, which needs torch and a llama.cpp checkout, and it identifies
BPE pre-tokenizers by hashing the tokenization of a probe string, so a vocabulary it has never
seen is refused (or, worse, mis-labelled). Here the GGUF is written directly: tensor names come
from ``gguf``'s name maps, quantization from its numpy quantizers, and the pre-tokenizer is read
from the tokenizer's own definition (its split regex and settings), so any tokenizer built on a
known pre-tokenizer converts. Ollama accepts safetensors LoRA adapters only for llama/gemma2, so a
Qwen adapter has to be a GGUF adapter: :func:`write_lora_gguf` writes one.

What each architecture needs (tensors, hyper-parameters, norm offsets, q/k row order) is its entry
in :data:`mlx_lora.model.families.FAMILIES` and its code in :mod:`mlx_lora.gguf.arch`; other
architectures are refused with one line naming llama.cpp's converter. Facts taken from llama.cpp
(``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``src/llama-vocab.cpp``): norms, biases
and other 1-D tensors stay f32; a matrix whose rows do not split into 32-element blocks falls back
to f16 under q8_0; LoRA tensors are ``<name>.weight.lora_a`` = A ``[r, in]`` and ``.lora_b`` = B
``[out, r]``, scaled by ``adapter.lora.alpha / r`` at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import atomic_file, read_json
from mlx_lora.core.weights import folder_tensors
from mlx_lora.gguf.arch import (
    add_family_keys,
    family_name,
    family_of,
    general_name,
    head_counts,
    longrope_factors,
    rope_dims,
    rope_params,
)
from mlx_lora.gguf.vocab import add_vocab, read_vocab
from mlx_lora.model.families import FAMILIES, Family
from mlx_lora.model.lora import Adapter, read_adapter
from mlx_lora.model.meta import generation_config, sampling_defaults

# --gguf-type → (tensor type for matrices, general.file_type)
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Every --gguf-type export accepts, and who writes it: "writer" = this module, directly (the types
# of GGUF_TYPES); "llama.cpp" = this module writes f16 (f32 for a float32 model), then llama.cpp's
# own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) turns it into the type,
# with llama.cpp's per-tensor mix (q4_k_m keeps attn_v/ffn_down partly at q6_k, the output at q6_k)
# and its fallbacks for rows that do not split into its blocks (256 for K-quants). The value is
# the file type llama.cpp records in general.file_type.
GGUF_EXPORT_TYPES: dict[str, tuple[str, gguf.LlamaFileType]] = {
    **{name: ("writer", ftype) for name, (_, ftype) in GGUF_TYPES.items()},
    **{
        name: ("llama.cpp", gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])
        for name in (
            "q4_0",
            "q4_1",
            "q5_0",
            "q5_1",
            "q2_k",
            "q3_k_s",
            "q3_k_m",
            "q3_k_l",
            "q4_k_s",
            "q4_k_m",
            "q5_k_s",
            "q5_k_m",
            "q6_k",
            "iq4_nl",
            "iq4_xs",
        )
    },
}
WRITER_TYPES = tuple(n for n, (who, _) in GGUF_EXPORT_TYPES.items() if who == "writer")
LLAMA_CPP_TYPES = tuple(n for n, (who, _) in GGUF_EXPORT_TYPES.items() if who == "llama.cpp")

_CHUNK_ELEMENTS = 1 << 24  # convert big matrices ~64 MB (f32) at a time


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _load_config(hf_dir: Path) -> tuple[dict, Family]:
    """config.json (text_config merged up) and the GGUF family it is written as."""
    if not hf_dir.is_dir():
        raise MlxLoraError(f"{hf_dir} is not a folder; pass a Hugging Face model folder")
    cfg = read_json(hf_dir / "config.json", required=True)
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    family = family_of(cfg, hf_dir)
    for key in ("quantization", "quantization_config"):
        if cfg.get(key):
            raise MlxLoraError(
                f"{hf_dir / 'config.json'} describes a quantized checkpoint ({key}); "
                "export from the unquantized model (fuse with --dtype float16/bfloat16)"
            )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(cfg.get(key), int):
            raise MlxLoraError(
                f"{hf_dir / 'config.json'}: {key} is missing; the config is incomplete"
            )
    kind = rope_params(cfg)["rope_type"]
    if kind not in family.rope_types:
        raise MlxLoraError(
            f"{hf_dir / 'config.json'}: rope scaling type {kind!r} is not supported for a "
            f"{family.name} GGUF (supported: {', '.join(family.rope_types)})"
        )
    return cfg, family


def _rope_perm(family: Family, hf_name: str, n_rows: int, cfg: dict) -> np.ndarray | None:
    """The q/k row order llama.cpp's llama arch expects (None: keep HF's order)."""
    if not family.rope_permute:
        return None
    n_head, n_kv, _ = head_counts(cfg)
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _llama_rope_rows(n_rows, n_head)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return _llama_rope_rows(n_rows, n_kv)
    return None


def _llama_rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k layout into GGUF's interleaved one.

    Per head, HF stores the first halves of all rotary pairs, then the second halves; llama.cpp's
    llama arch (like Meta's original weights) wants pair members next to each other. It is a pure
    row permutation: new row (h, i, j) = old row (h, j, i) for the view (heads, 2, half).
    """
    half = n_rows // n_head // 2
    idx = np.arange(n_rows).reshape(n_head, 2, half)
    return idx.swapaxes(1, 2).reshape(n_rows)


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    """One GGUF tensor: where its values come from and what they become."""

    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # logical (numpy order)
    qtype: gguf.GGMLQuantizationType
    source: Callable[[], mx.array] | None = None  # the whole source tensor, lazily
    perm: np.ndarray | None = None  # row order (llama's q/k RoPE layout)
    scale: float = 1.0
    shift: float = 0.0  # added after scaling (Gemma's norm offset)
    data: np.ndarray | None = None  # computed values (rope_freqs, rope factors)

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = math.prod(self.shape)
        return n // block * type_size


def _tensor_qtype(
    name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp's rules: 1-D, norms and non-weight tensors stay f32; unblockable rows → f16."""
    if (
        len(shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith((".weight", ".lora_a", ".lora_b"))
    ):
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def _encode(plan: _Planned) -> np.ndarray:
    """The bytes of one tensor in its GGUF type. The source is read once (at its own dtype) and
    converted a chunk of rows at a time, so memory stays near one tensor's size."""
    if plan.data is not None:
        return gguf.quants.quantize(plan.data.astype(np.float32), plan.qtype)
    assert plan.source is not None
    x = plan.source()
    mx.eval(x)

    def rows_f32(rows: slice) -> np.ndarray:
        idx = rows if plan.perm is None else mx.array(plan.perm[rows])
        out = np.array(x[idx].astype(mx.float32))
        out = out * np.float32(plan.scale) if plan.scale != 1.0 else out
        return out + np.float32(plan.shift) if plan.shift else out

    n_rows = plan.shape[0]
    row_elems = max(1, math.prod(plan.shape[1:]))
    step = n_rows if len(plan.shape) < 2 else max(1, _CHUNK_ELEMENTS // row_elems)
    chunks = [
        gguf.quants.quantize(rows_f32(slice(start, min(start + step, n_rows))), plan.qtype)
        for start in range(0, n_rows, step)
    ]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for rope_type "llama3" (per-frequency divisors)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _block_id(name: str) -> int:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return -1


def tied_embeddings(cfg: dict, names: Iterable[str]) -> bool:
    """Whether the output matrix is the embedding: config.json says so, or (no key, as some
    Gemma 3 folders ship) the weights do, by having no ``lm_head.weight`` — the importer's rule."""
    tie = cfg.get("tie_word_embeddings")
    return "lm_head.weight" not in set(names) if tie is None else bool(tie)


def _map_weights(
    hf_dir: Path, cfg: dict, family: Family, wanted: gguf.GGMLQuantizationType
) -> dict[str, _Planned]:
    """Every HF tensor of the folder under its GGUF name (norm offsets and q/k order applied)."""
    weights = folder_tensors(hf_dir)
    tmap = gguf.get_tensor_name_map(family.arch, cfg["num_hidden_layers"])
    planned: dict[str, _Planned] = {}
    for hf_name in sorted(weights, key=lambda n: (_block_id(n), n)):
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias")):
            continue
        if hf_name == "lm_head.weight" and family.head_unused:
            if not tied_embeddings(cfg, weights):
                raise MlxLoraError(
                    f"{hf_dir}: a separate lm_head cannot be stored in a {family.name} GGUF "
                    "(llama.cpp always uses the embedding as the output matrix)"
                )
            continue  # a saved copy of the tied embedding
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MlxLoraError(
                f"{hf_dir}: tensor {hf_name!r} has no GGUF counterpart for {family.name}; the "
                "checkpoint has layers llama.cpp cannot load"
            )
        src = weights[hf_name]
        perm = _rope_perm(family, hf_name, src.shape[0], cfg)
        qtype = _tensor_qtype(gname, src.shape, wanted)
        shift = family.norm_shift if hf_name.endswith("norm.weight") else 0.0
        planned[gname] = _Planned(gname, src.shape, qtype, src.load, perm, shift=shift)
    return planned


def _check_complete(hf_dir: Path, cfg: dict, family: Family, planned: dict) -> None:
    required = ["token_embd.weight", "output_norm.weight"]
    names = ["lm_head.weight"] if "output.weight" in planned else []
    for b in range(cfg["num_hidden_layers"]):
        required += [f"blk.{b}.{t}.weight" for t in family.block]
        required += [f"blk.{b}.{t}.bias" for t in family.block_bias]
    if not tied_embeddings(cfg, names) and not family.head_unused:
        required.append("output.weight")
    missing = [n for n in required if n not in planned]
    if missing:
        raise MlxLoraError(
            f"{hf_dir}: weights missing for "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; the checkpoint is "
            "incomplete, re-download or re-fuse it"
        )


def _computed_tensors(cfg: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that the checkpoint holds as config: rope frequency factors."""
    rope = rope_params(cfg)
    if rope["rope_type"] == "llama3":
        _, _, head_dim = head_counts(cfg)
        return {"rope_freqs.weight": _llama3_rope_factors(rope, head_dim)}
    if rope["rope_type"] == "longrope":
        return longrope_factors(cfg)
    return {}


def _plan_model_tensors(
    hf_dir: Path, cfg: dict, family: Family, wanted: gguf.GGMLQuantizationType
) -> list[_Planned]:
    planned = _map_weights(hf_dir, cfg, family, wanted)
    _check_complete(hf_dir, cfg, family, planned)
    order = ["token_embd.weight"]
    for name, data in _computed_tensors(cfg).items():
        planned[name] = _Planned(name, data.shape, gguf.GGMLQuantizationType.F32, data=data)
        order.append(name)
    rest = [n for n in planned if n not in order]
    rest.sort(key=lambda n: (n.startswith("output"), _block_id(n), n))
    return [planned[n] for n in order + rest]


def _add_hparams(
    w: gguf.GGUFWriter, cfg: dict, family: Family, ftype: gguf.LlamaFileType, n_vocab: int
) -> None:
    n_head, n_kv, head_dim = head_counts(cfg)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = rope_params(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_rope_dimension_count(rope_dims(cfg))
    if cfg.get("head_dim") or family.head_size_keys:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if family.vocab_size_key:
        w.add_vocab_size(n_vocab)
    _add_rope_scaling(w, cfg, rope)
    add_family_keys(w, family, cfg)
    w.add_file_type(int(ftype))


def _add_rope_scaling(w: gguf.GGUFWriter, cfg: dict, rope: dict) -> None:
    """linear and yarn as keys; llama3 and longrope are carried by tensors (and family keys)."""
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(
            int(rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings"))
        )
    elif kind == "longrope":
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def _add_sampling(w: gguf.GGUFWriter, hf_dir: Path) -> None:
    """generation_config.json's sampling advice as ``general.sampling.*``.

    llama-server and llama-cli use these keys as their defaults, and llama.cpp's converter writes
    them, so without them llama.cpp would sample a fused model differently from our chat
    (:func:`mlx_lora.model.meta.sampling_defaults`: ``do_sample: false`` means temperature 0).
    """
    setters = {
        "temperature": w.add_sampling_temp,
        "top_p": w.add_sampling_top_p,
        "top_k": w.add_sampling_top_k,
        "min_p": w.add_sampling_min_p,
        "repetition_penalty": w.add_sampling_penalty_repeat,
    }
    for key, value in sampling_defaults(generation_config(hf_dir)).items():
        setters[key](value)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _gguf_type(gguf_type: str) -> tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]:
    key = str(gguf_type).lower()
    if key not in GGUF_TYPES:
        raise MlxLoraError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[key]


def _write_file(
    out_path: Path, writer_setup: Callable, plans: list[_Planned], progress: bool, arch: str
) -> Path:
    """Write header, metadata and tensors to a temporary file, then rename it into place."""
    from tqdm import tqdm

    out_path = Path(out_path)
    if out_path.is_dir():
        raise MlxLoraError(f"{out_path} is a folder; pass the path of the .gguf file to write")
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer_setup(writer)
            for p in plans:
                writer.add_tensor_info(
                    p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = sum(p.nbytes for p in plans)
            desc = f"GGUF {out_path.name}"
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=desc, disable=not progress
            ) as bar:
                for p in plans:
                    writer.write_tensor_data(_encode(p))
                    bar.update(p.nbytes)
        finally:
            writer.close()
    return out_path


def planned_tensors(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → shape (numpy order) that :func:`write_gguf` writes for ``hf_dir``;
    verify reads a GGUF back against this."""
    cfg, family = _load_config(Path(hf_dir))
    plans = _plan_model_tensors(Path(hf_dir), cfg, family, gguf.GGMLQuantizationType.F32)
    return {p.name: p.shape for p in plans}


def planned_lora_tensors(adapter: Adapter, base_hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name → shape that :func:`write_lora_gguf` writes for ``adapter``."""
    cfg, family = _load_config(Path(base_hf_dir))
    plans = _plan_lora_tensors(
        adapter, Path(base_hf_dir), cfg, family, gguf.GGMLQuantizationType.F32
    )
    return {p.name: p.shape for p in plans}


def gguf_arch(config: dict) -> str | None:
    """The GGUF architecture of an HF config (None: not one mlx_lora writes)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return family_name(config)


def write_gguf(
    hf_dir: Path,
    out_path: Path,
    gguf_type: str = "f16",
    *,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Convert the Hugging Face model folder ``hf_dir`` into one GGUF file at ``out_path``.

    ``gguf_type``: f32, f16, bf16 or q8_0 (matrices; norms/biases stay f32). Tensors are read and
    written one at a time, so memory stays near one tensor's size. ``name``
    sets general.name (default: the folder name). Returns ``out_path``.
    """
    wanted, ftype = _gguf_type(gguf_type)
    hf_dir = Path(hf_dir)
    cfg, family = _load_config(hf_dir)
    plans = _plan_model_tensors(hf_dir, cfg, family, wanted)
    n_vocab = next(p.shape[0] for p in plans if p.name == "token_embd.weight")
    vocab = read_vocab(hf_dir, n_vocab)

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(general_name(family, name or hf_dir.resolve().name, vocab.rstrip_specials))
        _add_hparams(w, cfg, family, ftype, n_vocab)
        _add_sampling(w, hf_dir)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w, vocab)

    return _write_file(out_path, setup, plans, progress, family.name)


def write_vocab_gguf(hf_dir: Path, out_path: Path, arch: str = "llama") -> Path:
    """A vocabulary-only GGUF of the tokenizer in ``hf_dir`` (llama.cpp ``vocab_only`` loads it).

    It carries exactly the ``tokenizer.*`` keys :func:`write_gguf` writes, plus placeholder
    hyperparameters, so tokenizer tests can check our vocabulary code against llama.cpp without
    weights.
    """
    hf_dir = Path(hf_dir)
    vocab = read_vocab(hf_dir)
    family = FAMILIES[arch]
    placeholder = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": 64,
    }

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(hf_dir.resolve().name)
        _add_hparams(w, placeholder, family, gguf.LlamaFileType.ALL_F32, len(vocab.tokens))
        add_vocab(w, vocab)

    return _write_file(Path(out_path), setup, [], False, arch)


def _lora_target(module: str, tmap: Any, cfg: dict, base_shapes: dict, where: Path) -> str:
    """The GGUF name of the weight ``module`` adapts, refusing what a GGUF adapter cannot hold."""
    if module.endswith("embed_tokens"):
        raise MlxLoraError(
            f"{where}: LoRA on embed_tokens cannot be exported to a GGUF adapter; retrain "
            "without it"
        )
    gname = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
    tied = tied_embeddings(cfg, base_shapes) and "lm_head.weight" not in base_shapes
    if module.endswith("lm_head") and (tied or gname is None):
        raise MlxLoraError(
            f"{where}: LoRA on lm_head cannot apply to a model with tied embeddings; retrain "
            "without lm_head"
        )
    if gname is None:
        raise MlxLoraError(
            f"{where}: module {module!r} has no GGUF counterpart; retrain without it (or export "
            "--mode full)"
        )
    if gname == "output.weight" and tied:
        raise MlxLoraError(
            f"{where}: LoRA on lm_head cannot apply to a model with tied embeddings; retrain "
            "without lm_head"
        )
    return gname


def _plan_lora_tensors(
    lora: Adapter, base_hf_dir: Path, cfg: dict, family: Family, wanted: gguf.GGMLQuantizationType
) -> list[_Planned]:
    try:
        base_shapes = {k: v.shape for k, v in folder_tensors(base_hf_dir).items()}
    except MlxLoraError:
        base_shapes = {}  # config-only base: shapes cannot be cross-checked
    tmap = gguf.get_tensor_name_map(family.arch, cfg["num_hidden_layers"])
    pairs = lora.pairs()
    if not pairs:
        raise MlxLoraError(f"{lora.directory} holds no LoRA tensors; train an adapter first")
    plans: list[_Planned] = []
    for module in sorted(pairs, key=lambda n: (_block_id(n), n)):
        a, b = pairs[module]
        gname = _lora_target(module, tmap, cfg, base_shapes, lora.directory)
        base_shape = base_shapes.get(module + ".weight")
        if base_shape is not None and tuple(base_shape) != (b.shape[0], a.shape[1]):
            raise MlxLoraError(
                f"{lora.directory}: {module} is {b.shape[0]}x{a.shape[1]} in the adapter but "
                f"{tuple(base_shape)} in {base_hf_dir}; the adapter was trained on another base"
            )
        # llama.cpp applies alpha / rank; PEFT's own factor (rsLoRA, patterns) is folded into B
        fold = lora.scale(module) * a.shape[0] / lora.alpha
        perm = _rope_perm(family, module + ".weight", b.shape[0], cfg)
        for part, x, p, scale in (("lora_a", a, None, 1.0), ("lora_b", b, perm, fold)):
            name = f"{gname}.{part}"
            qtype = _tensor_qtype(name, tuple(x.shape), wanted)
            plans.append(_Planned(name, tuple(x.shape), qtype, lambda x=x: x, p, scale))
    return plans


def write_lora_gguf(
    adapter: Adapter | Path,
    base_hf_dir: Path,
    out_path: Path,
    gguf_type: str = "f32",
    *,
    progress: bool = False,
    name: str | None = None,
) -> Path:
    """Convert a PEFT LoRA adapter for ``base_hf_dir`` into a GGUF LoRA adapter.

    The result loads with llama.cpp's ``--lora`` and Ollama's ``ADAPTER`` on top of the base
    model's GGUF. Per-module scales that llama.cpp cannot express (rsLoRA, alpha_pattern) are
    folded into lora_b so that llama.cpp's ``alpha / r`` gives PEFT's exact update.
    """
    wanted, ftype = _gguf_type(gguf_type)
    lora = adapter if isinstance(adapter, Adapter) else read_adapter(Path(adapter))
    if lora.use_dora:
        raise MlxLoraError(
            f"{lora.directory} is a DoRA adapter, which a GGUF LoRA adapter cannot hold (llama.cpp "
            "applies plain LoRA); export with --mode full, which fuses DoRA exactly"
        )
    base_hf_dir = Path(base_hf_dir)
    cfg, family = _load_config(base_hf_dir)
    plans = _plan_lora_tensors(lora, base_hf_dir, cfg, family, wanted)

    def setup(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        w.add_name(name or lora.directory.resolve().name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return _write_file(out_path, setup, plans, progress, family.name)
