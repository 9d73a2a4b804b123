"""What a training run holds in memory, part by part, without reading a weight.

The model's shape comes from ``config.json`` (for qwen2, qwen3, llama and mistral parsed here, in
milliseconds; any other architecture is built lazily from mlx-lm's own classes, which allocates
nothing). From it: the loaded weights (per dtype / quantization), the trained state (LoRA, DoRA
or every weight; gradients; each ``--optim``'s state), and per micro-batch what MLX keeps for the
backward pass on each of the three training paths of :mod:`mlx_lora.train.loss`:

- ``fast``: qwen2/qwen3/llama blocks driven by :mod:`mlx_lora.train.forward` — rows trimmed to their
  examples, attention per example (Σ lengthᵢ² scores), target-only vocabulary projection;
- ``packed``: the other :data:`mlx_lora.train.loss.PACKED_TYPES`, compiled, rows padded to 32
tokens,
  a block-diagonal mask (rows × length² scores);
- ``general``: the model's own forward, one example per row, full ``[rows, length, vocab]`` logits.

Each term below is what the code keeps (counted from what each operation's backward needs); the
``COEF`` multipliers were fitted to peaks measured with MLX's counter on a CPU
(``scripts/calibrate_plan.py``). A GPU (Metal) could not be measured here: its prediction uses
the same terms with bf16 activations, fp32 LoRA and loss values, and fused attention (no
length² term) — derived, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.core.dtypes import DTYPE_BYTES, config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json
from mlx_lora.data.dataset import pack_rows, padded_targets
from mlx_lora.model.families import FAMILIES
from mlx_lora.model.load import (  # how load_base quantizes
    QUANT_CHUNK_BYTES,
    QUANT_GROUP,
    load_error,
)
from mlx_lora.model.lora import normalize_targets, resolve_targets
from mlx_lora.train.loss import LOSS_CHUNK, training_path

# read here (the families marked ``plan_parsed``); others via mlx-lm's classes
PARSED_TYPES = tuple(t for f in FAMILIES.values() if f.plan_parsed for t in f.model_types)
# config.json sizes, as most families (and the older GPT-style ones) name them
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SIZE_KEYS += ("intermediate_size", "vocab_size", "head_dim", "n_embd", "n_layer", "n_head")
SIZE_KEYS += ("n_inner", "d_model")
LAYER_KEYS = ("num_hidden_layers", "n_layer")
# The largest released models have ~130 blocks; the plan lists every block's parameters, so a
# damaged count of millions would take minutes and gigabytes before it could say "does not fit".
MAX_LAYERS = 1024
MAX_SIZE = 2**31 - 1  # MLX's array dimensions are 32-bit


# ---------------------------------------------------------------- the model, from config.json


@dataclass(frozen=True)
class Param:
    """One parameter as mlx-lm builds it (logical shape, before any quantization)."""

    path: str
    shape: tuple[int, ...]
    quantizable: bool = False  # the weight of a Linear / Embedding (``to_quantized``)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """What the memory depends on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: tuple[Param, ...]
    path: str  # fast, packed or general (see the module docstring)
    stored_bytes: int = 2  # per weight in the files
    stored_bits: int | None = None  # an already quantized folder
    stored_group: int = QUANT_GROUP
    qk_norm: bool = False

    @property
    def parameters(self) -> int:
        return sum(p.size for p in self.params)

    def linears(self, layer: int) -> dict[str, tuple[int, int]]:
        """The linears of block ``layer`` by module name: (out, in)."""
        prefix = f"layers.{layer}."
        out = {}
        for p in self.params:
            if p.quantizable and prefix in p.path and p.path.endswith(".weight"):
                out[p.path.rsplit(".", 2)[-2]] = (p.shape[0], p.shape[1])
        return out


def read_shape(model_dir: Path) -> ModelShape:
    """The shape of the model in ``model_dir`` from its ``config.json``."""
    path = Path(model_dir) / "config.json"
    c = read_json(path, required=True)
    kind = c.get("model_type")
    check_config(c, path)
    if kind in PARSED_TYPES:
        try:
            shape = _parsed_shape(c, kind)
        except (KeyError, TypeError, ValueError) as e:
            raise MlxLoraError(f"{path}: missing or bad {e} for model_type {kind!r}") from None
    else:
        shape = _built_shape(c, kind, Path(model_dir))
    quant = c.get("quantization") or {}
    stored = DTYPE_BYTES.get(config_dtype(c, "bfloat16"), 2)
    return ModelShape(
        **shape,
        stored_bytes=stored,
        stored_bits=int(quant["bits"]) if quant.get("bits") else None,
        stored_group=int(quant.get("group_size") or QUANT_GROUP),
    )


def check_config(c: dict, path: Path) -> None:
    """Refuse sizes no model has before anything is built from them: one line naming the key
    (not a ZeroDivisionError for 0 heads, a plan of negative bytes, or minutes for 10^7 layers)."""
    for key in SIZE_KEYS:
        v = c.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise MlxLoraError(f"{path}: {key} is {v!r}, not a whole number; {_FIX}")
        most = MAX_LAYERS if key in LAYER_KEYS else MAX_SIZE
        if not 1 <= v <= most:
            why = " (the largest released models have ~130 blocks)" if key in LAYER_KEYS else ""
            raise MlxLoraError(f"{path}: {key} is {v:,}, outside 1 to {most:,}{why}; {_FIX}")
    heads, kv = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise MlxLoraError(
            f"{path}: num_key_value_heads ({kv}) does not divide num_attention_heads ({heads}); "
            f"{_FIX}"
        )
    hidden, kind = c.get("hidden_size"), c.get("model_type")
    own_head_dim = c.get("head_dim") and kind != "qwen2"  # mlx-lm's qwen2 always splits hidden
    if kind in PARSED_TYPES and hidden and heads and hidden % heads and not own_head_dim:
        raise MlxLoraError(
            f"{path}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) "
            f"and there is no head_dim; {_FIX}"
        )
    quant = c.get("quantization")
    if quant is not None:
        known = isinstance(quant, dict)
        bits, group = (quant.get("bits"), quant.get("group_size", QUANT_GROUP)) if known else (0, 0)
        if bits not in (None, 2, 3, 4, 5, 6, 8) or type(group) is not int or group < 1:
            raise MlxLoraError(
                f"{path}: quantization is {quant!r}, not {{'bits': 2-8, 'group_size': N}}; {_FIX}"
            )


_FIX = "fix or re-download config.json"


def _parsed_shape(c: dict, kind: str) -> dict:
    """qwen2 / qwen3 / llama / mistral, exactly as mlx-lm 0.32 builds them (its defaults)."""
    d, layers, heads = (
        int(c["hidden_size"]),
        int(c["num_hidden_layers"]),
        int(c["num_attention_heads"]),
    )
    kv = int(c.get("num_key_value_heads") or heads)
    hd = d // heads if kind == "qwen2" else int(c.get("head_dim") or d // heads)
    f, vocab = int(c["intermediate_size"]), int(c["vocab_size"])
    tied = (
        bool(c["tie_word_embeddings"])
        if kind == "qwen3"
        else bool(c.get("tie_word_embeddings", True))
    )
    attn_bias = kind == "qwen2" or (kind != "qwen3" and bool(c.get("attention_bias")))
    mlp_bias = kind in FAMILIES["llama"].model_types and bool(c.get("mlp_bias"))
    params = [Param("model.embed_tokens.weight", (vocab, d), True)]
    for i in range(layers):
        params += _block_params(
            f"model.layers.{i}.", d, heads * hd, kv * hd, f, hd, kind, attn_bias, mlp_bias
        )
    params.append(Param("model.norm.weight", (d,)))
    if not tied:
        params.append(Param("lm_head.weight", (vocab, d), True))
    sliding = "sliding_attention" in (c.get("layer_types") or [])
    return {
        "model_type": kind,
        "hidden": d,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": hd,
        "intermediate": f,
        "vocab": vocab,
        "params": tuple(params),
        "path": "packed" if sliding else "fast",
        "qk_norm": kind == "qwen3",
    }


def _block_params(
    p: str, d: int, q: int, kv: int, f: int, hd: int, kind: str, attn_bias: bool, mlp_bias: bool
) -> list[Param]:
    out = [
        Param(p + "input_layernorm.weight", (d,)),
        Param(p + "post_attention_layernorm.weight", (d,)),
    ]
    for name, rows, cols in (
        ("q_proj", q, d),
        ("k_proj", kv, d),
        ("v_proj", kv, d),
        ("o_proj", d, q),
    ):
        out.append(Param(f"{p}self_attn.{name}.weight", (rows, cols), True))
        if attn_bias and (name != "o_proj" or kind != "qwen2"):
            out.append(Param(f"{p}self_attn.{name}.bias", (rows,)))
    if kind == "qwen3":
        out += [
            Param(p + "self_attn.q_norm.weight", (hd,)),
            Param(p + "self_attn.k_norm.weight", (hd,)),
        ]
    for name, rows, cols in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
        out.append(Param(f"{p}mlp.{name}.weight", (rows, cols), True))
        if mlp_bias:
            out.append(Param(f"{p}mlp.{name}.bias", (rows,)))
    return out


def _built_shape(c: dict, kind: str, model_dir: Path) -> dict:
    """Any other architecture: mlx-lm's model built lazily (its parameters are never computed);
    what it cannot build fails with loading's own one-line error."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(c)
        args = args_class.from_dict(c)
        model = model_class(args)
    except (ValueError, KeyError, TypeError) as e:
        raise load_error(model_dir, e) from None
    modules = dict(model.named_modules())
    params = []
    for name, value in tree_flatten(model.parameters()):
        owner = modules.get(name.rsplit(".", 1)[0])
        quantizable = name.endswith(".weight") and hasattr(owner, "to_quantized")
        params.append(Param(name, tuple(value.shape), quantizable))
    d = int(_arg(args, c, "hidden_size", "n_embd", "d_model"))
    heads = int(_arg(args, c, "num_attention_heads", "n_head"))
    hd = int(_arg(args, c, "head_dim", default=d // heads))
    return {
        "model_type": kind,
        "hidden": d,
        "layers": len(model.layers),
        "heads": heads,
        "kv_heads": int(_arg(args, c, "num_key_value_heads", default=heads)),
        "head_dim": hd,
        "intermediate": int(_arg(args, c, "intermediate_size", "n_inner", default=4 * d)),
        "vocab": int(_arg(args, c, "vocab_size")),
        "params": tuple(params),
        "path": training_path(kind),
        "qk_norm": any(".q_norm." in p.path for p in params),
    }


def _arg(args: Any, c: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(args, n, None) or c.get(n)
        if v:
            return v
    if default is None:
        raise KeyError(names[0])
    return default


# ---------------------------------------------------------------- weights, trained state


def dtype_name(nbytes: int) -> str:
    return "float32" if nbytes == 4 else "bfloat16"


def weight_bytes(shape: ModelShape, nbytes: int, bits: int | None) -> dict[str, int]:
    """Bytes of the loaded weights by storage kind. A quantized matrix keeps ``bits`` per weight
    plus a scale and a bias (compute dtype) per group; the rest is in the compute dtype."""
    group = shape.stored_group if shape.stored_bits else QUANT_GROUP
    parts: dict[str, int] = {}
    for p in shape.params:
        if bits and p.quantizable and p.shape[-1] % group == 0:
            key = f"{bits}-bit matrices"
            parts[key] = parts.get(key, 0) + p.size * bits // 8 + 2 * p.size // group * nbytes
        else:
            key = f"{dtype_name(nbytes)} {'matrices' if len(p.shape) > 1 else 'norms, biases'}"
            parts[key] = parts.get(key, 0) + p.size * nbytes
    return parts


def load_extra_bytes(shape: ModelShape, nbytes: int, bits: int | None) -> int:
    """Loading's peak above the final weights (:func:`mlx_lora.model.load.materialize` reads one
    module at a time): the largest matrix as stored while its cast copy (the final weight) is
    made; quantized, also one compute-dtype row block of it (measured: 4B-shaped bf16 → 4-bit
    loads at 3.00 GB for 2.22 GB of weights)."""
    biggest = max((p for p in shape.params if p.quantizable), key=lambda p: p.size)
    n = biggest.size
    if shape.stored_bits:
        return n * shape.stored_bits // 8
    stored = n * shape.stored_bytes
    cast = n * nbytes if nbytes != shape.stored_bytes else 0
    if bits and biggest.shape[-1] % QUANT_GROUP == 0:
        block = min(n * nbytes, QUANT_CHUNK_BYTES * nbytes // 4)
        return stored + block
    return stored if cast else 0  # the cast copy is the final weight


def lora_layers(cfg: Any, shape: ModelShape) -> list[int]:
    """The adapted blocks: all, or the last ``--lora-layers``."""
    if cfg.finetune_type == "full" or not cfg.lora_layers:
        return list(range(shape.layers))
    return list(range(max(0, shape.layers - cfg.lora_layers), shape.layers))


def adapted(cfg: Any, shape: ModelShape) -> dict[str, tuple[int, int]]:
    """The adapted linears of one block (``--target-modules``, aliases as train resolves them):
    name → (out, in). Unknown names raise train's own error."""

    linears = shape.linears(shape.layers - 1)
    names = resolve_targets(normalize_targets(cfg.target_modules), sorted(linears))
    return {n: linears[n] for n in names}


def uses_dora(cfg: Any) -> bool:
    return bool(cfg.use_dora) or cfg.finetune_type == "dora"


def trained_shapes(cfg: Any, shape: ModelShape) -> list[tuple[int, ...]]:
    """Shapes of the trained values: LoRA A [r, in] and B [out, r] (and DoRA's magnitudes) of
    every adapted linear; every weight for ``--finetune-type full``."""
    if cfg.finetune_type == "full":
        return [p.shape for p in shape.params]
    per_block: list[tuple[int, ...]] = []
    for out, inp in adapted(cfg, shape).values():
        per_block += [(cfg.lora_r, inp), (out, cfg.lora_r)] + ([(out,)] if uses_dora(cfg) else [])
    return per_block * len(lora_layers(cfg, shape))


def optimizer_values(optim: str, shapes: list[tuple[int, ...]]) -> int:
    """Values of ``--optim``'s state (MLX's optimizers): Adam/AdamW two per value, SGD and Muon
    one, Adafactor a row and a column vector per matrix (one per value of a vector)."""
    name = {"adamw_torch": "adamw", "adamw_hf": "adamw"}.get(optim, optim)
    total = 0
    for s in shapes:
        n = math.prod(s)
        if name in ("adamw", "adam"):
            total += 2 * n
        elif name in ("sgd", "muon"):
            total += n
        elif name == "adafactor":
            total += s[-2] + s[-1] if len(s) >= 2 else n
    return total


# ---------------------------------------------------------------- micro-batches


@dataclass(frozen=True, order=True)
class MicroBatch:
    """What one micro-batch computes: ``tokens`` positions through the blocks, ``attention``
    score entries per head (Σ lengthᵢ² per example, or rows × length² with a mask), ``targets``
    rows of the vocabulary projection, in ``rows`` rows of up to ``length`` tokens."""

    tokens: int
    attention: int
    targets: int
    rows: int
    length: int


def layout(
    lengths: list[int], trained: list[int], max_len: int, path: str, packing: bool, lanes: int
) -> MicroBatch:
    """The micro-batch :func:`mlx_lora.data.dataset.make_batch` builds from examples of ``lengths``
    (``trained``: their target tokens) on ``path``, as :mod:`mlx_lora.train.loop` calls it."""

    if path == "fast":  # exact shapes, rows side by side, rows without targets skipped
        rows, _ = pack_rows(lengths, max_len, packing, 1, lanes)
        rows = [r for r in rows if sum(trained[i] for i in r)]
        fills = [sum(lengths[i] for i in r) for r in rows]
        attention = sum(lengths[i] ** 2 for r in rows for i in r)
        return MicroBatch(sum(fills), attention, sum(trained), len(rows), max(fills, default=0))
    rows, length = pack_rows(lengths, max_len, packing and path == "packed")
    n = len(rows)
    return MicroBatch(n * length, n * length * length, padded_targets(sum(trained)), n, length)


# ---------------------------------------------------------------- activations and the loss

# Which adapted linears read the same input (one kept copy of it without dropout).
INPUT_GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "qkv_proj": "attn"}
INPUT_GROUPS |= {"gate_proj": "mlp", "up_proj": "mlp", "gate_up_proj": "mlp", "c_fc": "mlp"}

# Multipliers of the counted terms, per path and checkpointing (see activation_terms), fitted to
# 92 measured step peaks on a CPU by scripts/calibrate_plan.py (rms error of the activations:
# fast path 15.2% / 16.5% without / with checkpointing; the packed and general paths from 3 cases
# each, so only their dominant terms). "blocks" is never below 1: what a block keeps is kept in
# full (the free fit's 0.48 without checkpointing came from 3-6-block models and under-predicted
# the 30-block SmolLM2 by 27%; at 1.0 it is within 1%).
TERMS = ("blocks", "workspace", "embed", "row", "logits", "chunk")
COEF: dict[tuple[str, bool], dict[str, float]] = {
    # (path, checkpointing): blocks, workspace, embed, row, logits, chunk
    ("fast", False): dict(zip(TERMS, (1.0, 0.0, 0.0, 111.035, 1.905, 2.428), strict=True)),
    ("fast", True): dict(zip(TERMS, (1.0, 0.0, 0.0, 97.912, 1.726, 1.263), strict=True)),
    ("packed", False): dict(zip(TERMS, (0.0, 0.0, 0.0, 0.0, 13.268, 0.0), strict=True)),
    ("packed", True): dict(zip(TERMS, (1.0, 0.0, 0.0, 0.0, 6.873, 0.0), strict=True)),
    ("general", False): dict(zip(TERMS, (0.598, 0.199, 0.0, 0.0, 4.172, 0.0), strict=True)),
    ("general", True): dict(zip(TERMS, (1.0, 0.0, 0.0, 0.0, 3.823, 0.0), strict=True)),
}


def token_bytes(cfg: Any, shape: ModelShape, nbytes: int, gpu: bool) -> float:
    """Bytes one trained block keeps per token for its backward pass: the norms' inputs, the
    roped queries, keys and values, SwiGLU's two inputs; the adapted linears' inputs (each
    with its own dropout mask and dropped copy when ``--lora-dropout`` > 0; fp32 copies on a GPU,
    where the compute dtype is bf16), their rank-r products, DoRA's two output-sized terms; a
    full fine-tune keeps every linear's input for its weight gradient."""
    d, f = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    values = 2 * d + q + 2 * kv + 2 * f + (q + kv) * shape.qk_norm
    if cfg.finetune_type == "full":
        return (values + 2 * d + q + f) * nbytes
    lin = adapted(cfg, shape)
    extra = 0.0
    if cfg.lora_dropout > 0:
        extra += sum(2 * i * nbytes for _, i in lin.values())
    else:
        groups = {INPUT_GROUPS.get(n, n): i for n, (_, i) in lin.items()}
        extra += sum(i * nbytes for i in groups.values())
    if gpu:
        extra += sum(4 * i for _, i in lin.values())
    extra += sum(3 * cfg.lora_r * 4 for _ in lin)
    if uses_dora(cfg):
        extra += sum(2 * 4 * o for o, _ in lin.values())
    return values * nbytes + extra


def dora_weight_bytes(cfg: Any, shape: ModelShape) -> int:
    """DoRA with dropout computes the base output of the dropped input against a dense fp32
    copy of the weight (:class:`mlx_lora.model.lora.LoRALinear`); the backward pass needs that copy,
    so every adapted block keeps one per adapted linear."""
    if not uses_dora(cfg) or cfg.lora_dropout <= 0:
        return 0
    return sum(4 * o * i for o, i in adapted(cfg, shape).values())


def activation_terms(
    cfg: Any, shape: ModelShape, mb: MicroBatch, nbytes: int, checkpointing: bool, gpu: bool
) -> dict[str, float]:
    """The counted terms (bytes) of one micro-batch's forward + backward, before ``COEF``:

    ``blocks``: what every trained block keeps (all of it; with checkpointing, its input only);
    ``workspace``: one block's worth (the block being differentiated, or recomputed);
    ``embed``: hidden states once (embedding, final norm); ``row``: hidden states of the longest
    row (measured on the fast path: per-row workspace of the blocks, not accounted otherwise);
    ``logits``: the fp32 vocabulary
    projection of every target (``general``: also the full logits) — measured, the
    cross-entropy's temporaries scale with it even with checkpointing, as MLX evaluates the
    chunks of one micro-batch in one graph; ``chunk``: one ``LOSS_CHUNK`` of it.
    """
    trained = len(lora_layers(cfg, shape))
    per_token = token_bytes(cfg, shape, nbytes, gpu)
    score_bytes = 0 if gpu and shape.path == "fast" else (4 if shape.path == "fast" else nbytes)
    one_block = mb.tokens * per_token + shape.heads * mb.attention * score_bytes
    one_block += dora_weight_bytes(cfg, shape)
    hidden = mb.tokens * shape.hidden * nbytes
    blocks = trained * (hidden if checkpointing else one_block)
    logits = mb.targets * shape.vocab * 4
    if shape.path == "general":
        logits += mb.rows * mb.length * shape.vocab * nbytes
    chunk = min(mb.targets, LOSS_CHUNK * max(1, mb.rows)) * shape.vocab * 4
    return {
        "blocks": blocks,
        "workspace": one_block,
        "embed": hidden,
        "row": mb.length * shape.hidden * nbytes,
        "logits": logits,
        "chunk": chunk,
    }


KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
PREFILL_STEP = 2048  # mlx-lm's generate_step prefills the prompt in chunks of this many


def generation_bytes(shape: ModelShape, prompt: int, completion: int, nbytes: int) -> int:
    """GRPO's sampling (one answer at a time through mlx-lm's generation): the KV cache of every
    block for prompt + completion tokens (allocated in ``KV_STEP`` steps), the prefill's
    workspace of one block over a prompt chunk (hidden states, SwiGLU, attention scores) and one
    step's vocabulary logits (fp32). Training's activations are freed by then; the weights, LoRA
    and optimizer state are not (the caller adds them)."""
    kv = shape.kv_heads * shape.head_dim
    cache = shape.layers * 2 * kv * (-(-(prompt + completion) // KV_STEP) * KV_STEP) * nbytes
    chunk = min(max(prompt, 1), PREFILL_STEP)
    prefill = chunk * (2 * shape.hidden + 2 * shape.intermediate) * nbytes
    prefill += shape.heads * chunk * chunk * nbytes
    return int(cache + prefill + shape.vocab * 4)


def activation_bytes(
    cfg: Any, shape: ModelShape, mb: MicroBatch, nbytes: int, checkpointing: bool, gpu: bool
) -> tuple[int, int]:
    """(blocks, loss) bytes of one micro-batch at its peak: the terms times ``COEF``."""
    terms = activation_terms(cfg, shape, mb, nbytes, checkpointing, gpu)
    coef = COEF[(shape.path, checkpointing)]
    loss = sum(terms[k] * coef[k] for k in ("logits", "chunk"))
    blocks = sum(terms[k] * coef[k] for k in ("blocks", "workspace", "embed", "row"))
    return int(blocks), int(loss)
