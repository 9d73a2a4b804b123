"""The model families mlx_lora writes as GGUF itself: names, tensors, hyper-parameters, checks.

The families and their facts are the table :data:`mlx_lora.model.families.FAMILIES`; this module
is their writer code (config readers, the hyper-parameters each family writes for itself, the HF
class → family lookup).

llama.cpp runs a GGUF with its own implementation of each architecture, so every fact that
implementation does not read from the file must already hold in the weights, and every fact it
does read must be written. The facts below are llama.cpp's (``convert_hf_to_gguf.py`` and its
``conversion/`` classes, ``src/models/*.cpp``), written down here; the code is ours:

- qwen2, qwen3: NeoX RoPE, so HF's q/k row order stays; qwen3 adds per-head q/k RMSNorm
  (``attn_q_norm``/``attn_k_norm``) and a head size independent of hidden/heads (``key_length``).
- llama (Llama 3.x, Mistral, SmolLM): q/k rows are permuted to the interleaved RoPE layout;
  ``llama.vocab_size``; Llama 3.1+ rope scaling becomes a ``rope_freqs`` tensor.
- gemma2, gemma3: HF's RMSNorm weight ``w`` means ``1 + w``; the GGUF stores ``1 + w`` (every
  ``*norm.weight``, q/k norms included). The ``sqrt(hidden)`` embedding scale is in llama.cpp's
  graph. Queries are scaled by ``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` for the layer
  counts llama.cpp takes for the 27B models, so ``query_pre_attn_scalar`` must be that number.
  Gemma 2: attention and final logit soft-capping, a sliding window on every second layer,
  ``output.weight`` never read (tied). Gemma 3: optional final soft-capping, no attention
  soft-capping, sliding window layers with their own rope base (``rope.freq_base_swa``), linear
  rope scaling on the global layers only.
- phi3 (Phi-3, 3.5, 4): fused ``attn_qkv`` and ``ffn_up`` (gate rows, then up rows) exactly as HF
  stores them; rope dimensions ``partial_rotary_factor * hidden / heads``; the original context
  length; LongRoPE as ``rope_factors_long``/``rope_factors_short`` tensors plus an attention factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gguf
import numpy as np

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.families import FAMILIES, Family

CONVERTER_HINT = (
    "convert the Hugging Face folder with llama.cpp's convert_hf_to_gguf.py (python "
    "convert_hf_to_gguf.py {folder} --outtype f16)"
)

# family name → the function writing its own hyper-parameters (registered by ``_keys_of`` below)
_FAMILY_KEYS: dict[str, Callable[[gguf.GGUFWriter, dict], None]] = {}


def _no_keys(w: gguf.GGUFWriter, cfg: dict) -> None:
    return None


def _keys_of(name: str) -> Callable:
    """Register the decorated function as family ``name``'s hyper-parameter writer."""
    if name not in FAMILIES:
        raise ValueError(f"{name!r} is not in mlx_lora.model.families.FAMILIES")

    def register(fn: Callable[[gguf.GGUFWriter, dict], None]) -> Callable:
        _FAMILY_KEYS[name] = fn
        return fn

    return register


def add_family_keys(w: gguf.GGUFWriter, family: Family, cfg: dict) -> None:
    """The hyper-parameters llama.cpp reads for ``family`` alone (none for most families)."""
    _FAMILY_KEYS.get(family.name, _no_keys)(w, cfg)


# ----------------------------------------------------------------------- config readers


def head_counts(cfg: dict) -> tuple[int, int, int]:
    """(heads, kv heads, head size)."""
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    return n_head, n_kv, head_dim


def rope_params(cfg: dict) -> dict:
    """Rope settings of the (global) attention layers, whether the config says ``rope_scaling``
    (transformers ≤ 4.x) or ``rope_parameters`` (5.x, per layer type for Gemma 3)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params:
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    if params["rope_type"] == "su":
        params["rope_type"] = "longrope"
    return params


def rope_dims(cfg: dict) -> int:
    """Rotated dimensions per head (all of them unless ``partial_rotary_factor`` < 1)."""
    n_head, _, head_dim = head_counts(cfg)
    partial = cfg.get("partial_rotary_factor") or rope_params(cfg).get("partial_rotary_factor")
    if partial is None:
        return head_dim
    if cfg.get("head_dim"):
        return int(partial * head_dim)
    return int(partial * cfg["hidden_size"]) // n_head


def _swa_rope_base(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    local = params.get("sliding_attention", {}).get("rope_theta")
    return float(local or cfg.get("rope_local_base_freq") or 10000.0)


def sliding_layers(cfg: dict, default_pattern: int) -> list[bool]:
    """Which layers use the sliding window: HF's ``layer_types`` when given, else every layer but
    each ``sliding_window_pattern``-th one (HF's and mlx-lm's rule)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [t == "sliding_attention" for t in types]
    pattern = int(cfg.get("sliding_window_pattern") or default_pattern)
    return [(i + 1) % pattern != 0 for i in range(n)]


# -------------------------------------------------------------------------- family keys


def _check_query_scale(cfg: dict, big_layers: int, where: str) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) when the layer count is
    that of the 27B model); HF by 1/sqrt(query_pre_attn_scalar). They must be the same number."""
    n_head, _, head_dim = head_counts(cfg)
    llama_cpp = cfg["hidden_size"] / n_head if cfg["num_hidden_layers"] == big_layers else head_dim
    ours = cfg.get("query_pre_attn_scalar", 256)
    if not math.isclose(float(ours), float(llama_cpp)):
        raise MlxLoraError(
            f"{where}: query_pre_attn_scalar is {ours} but llama.cpp scales this model's queries "
            f"by 1/sqrt({llama_cpp:g}); the GGUF would compute other attention, so it is not "
            "written (the model cannot run correctly in llama.cpp or Ollama)"
        )


@_keys_of("gemma2")
def _gemma2_keys(w: gguf.GGUFWriter, cfg: dict) -> None:
    _check_query_scale(cfg, 46, "gemma2")
    caps = {}
    for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        caps[key] = cfg.get(key, default)  # missing: HF's default; null: no capping
        if caps[key] is None:
            raise MlxLoraError(
                f"gemma2: {key} is null but llama.cpp's Gemma 2 always soft-caps; the GGUF "
                "would compute other logits, so it is not written"
            )
    w.add_attn_logit_softcapping(float(caps["attn_logit_softcapping"]))
    w.add_final_logit_softcapping(float(caps["final_logit_softcapping"]))
    w.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    w.add_sliding_window_pattern(sliding_layers(cfg, 2))


@_keys_of("gemma3")
def _gemma3_keys(w: gguf.GGUFWriter, cfg: dict) -> None:
    _check_query_scale(cfg, 62, "gemma3")
    if cfg.get("attn_logit_softcapping"):
        raise MlxLoraError(
            "gemma3: attn_logit_softcapping is set but llama.cpp's Gemma 3 has no attention "
            "soft-capping; the GGUF would compute other attention, so it is not written"
        )
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    w.add_rope_freq_base_swa(_swa_rope_base(cfg))
    layers = sliding_layers(cfg, 6)
    if any(layers):
        w.add_sliding_window(int(cfg.get("sliding_window") or 4096))
        w.add_sliding_window_pattern(layers)


@_keys_of("phi3")
def _phi3_keys(w: gguf.GGUFWriter, cfg: dict) -> None:
    n_head, _, head_dim = head_counts(cfg)
    if n_head * head_dim != cfg["hidden_size"]:
        raise MlxLoraError(
            f"phi3: heads x head_dim ({n_head} x {head_dim}) differs from hidden_size "
            f"{cfg['hidden_size']}; llama.cpp's Phi-3 cannot hold that shape"
        )
    original = rope_params(cfg).get("original_max_position_embeddings")
    original = original or cfg.get("original_max_position_embeddings")
    if original:
        w.add_rope_scaling_orig_ctx_len(int(original))
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))
    if rope_params(cfg)["rope_type"] == "longrope":
        w.add_rope_scaling_attn_factors(longrope_attn_factor(cfg))


def longrope_attn_factor(cfg: dict) -> float:
    """LongRoPE's attention (magnitude) factor: sqrt(1 + ln(s) / ln(original)), s = ctx ratio."""
    original = float(cfg.get("original_max_position_embeddings") or 4096)
    scale = float(cfg.get("max_position_embeddings") or original) / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


def longrope_factors(cfg: dict) -> dict[str, np.ndarray]:
    """``rope_factors_long``/``_short`` tensors (one factor per rotated pair) for LongRoPE."""
    params = rope_params(cfg)
    out = {}
    for kind in ("long", "short"):
        factors = params.get(f"{kind}_factor")
        if not isinstance(factors, list) or len(factors) * 2 != rope_dims(cfg):
            raise MlxLoraError(
                f"phi3: rope_scaling {kind}_factor must list {rope_dims(cfg) // 2} numbers; "
                "config.json is inconsistent"
            )
        out[f"rope_factors_{kind}.weight"] = np.asarray(factors, dtype=np.float32)
    return out


# HF ``architectures`` entry → family.
HF_ARCHITECTURES: dict[str, str] = {
    hf: name for name, family in FAMILIES.items() for hf in family.hf_architectures
}


def general_name(family: Family, name: str, rstrip_specials: tuple[str, ...]) -> str:
    """general.name, which llama.cpp also reads as a switch: only when it contains "phi3" or
    "phi-3" does llama.cpp let Phi-3's special tokens swallow the whitespace after them, as HF's
    ``rstrip`` tokens do. Without it, a chat rendered as ``<|user|>\nHi<|end|>\n`` would get extra
    tokens in llama.cpp and Ollama that the model never saw in training."""
    says_phi3 = "phi3" in name.lower() or "phi-3" in name.lower()
    if family.name == "phi3" and rstrip_specials and not says_phi3:
        return f"{name} (phi3)"
    return name


def family_name(cfg: dict) -> str | None:
    """The GGUF architecture of an HF config (None: not one mlx_lora writes)."""
    archs = cfg.get("architectures") or [None]
    return HF_ARCHITECTURES.get(archs[0])


def family_of(cfg: dict, folder: object) -> Family:
    """The family of the HF config of ``folder``, or a one-line refusal that names llama.cpp's
    converter on that folder as the way on."""
    name = family_name(cfg)
    if name is None:
        archs = cfg.get("architectures") or [None]
        raise MlxLoraError(
            f"{folder}: architecture {archs[0]!r} is not written to GGUF directly (only "
            f"{', '.join(sorted(HF_ARCHITECTURES))}); " + CONVERTER_HINT.format(folder=folder)
        )
    return FAMILIES[name]
