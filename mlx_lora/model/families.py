"""The model families: one table of what every stage needs to know about each architecture.

Adding a family means one entry here plus its writer code (tensor names, permutations and family
hyper-parameters in :mod:`mlx_lora.gguf.arch` / :mod:`mlx_lora.gguf.writer`). Every per-family
list elsewhere (``FAST_TYPES``, ``PACKED_TYPES``, ``PARSED_TYPES``, ``HF_ARCHITECTURES``,
``SUPPORTED``, ``GELU_TABLE_ARCHS``) is derived from :data:`FAMILIES`; none is written by hand.

Which stage reads which field:

- GGUF writing (:mod:`mlx_lora.gguf.arch`, :mod:`mlx_lora.gguf.writer`): ``name``, ``arch``,
  ``block``, ``block_bias``, ``rope_permute``, ``norm_shift``, ``head_unused``, ``rope_types``,
  ``vocab_size_key``, ``head_size_keys``, ``hf_architectures`` (which HF folders are written as
  which family: ``HF_ARCHITECTURES``).
- GGUF reading (:mod:`mlx_lora.model.gguf_import`): ``gguf_import`` (``SUPPORTED``), ``arch``,
  ``block``, ``rope_permute`` (undone), and the first of ``hf_architectures`` / ``model_types``
  (the config.json it writes).
- Training (:mod:`mlx_lora.train.forward`, :mod:`mlx_lora.train.loss`): ``fast_forward``
  (``FAST_TYPES``), ``packed_loss`` (``PACKED_TYPES``), ``model_types``.
- Planning (:mod:`mlx_lora.plan.footprint`): ``plan_parsed`` (``PARSED_TYPES``), ``model_types``;
  its path follows training's ``packed_loss``.
- Verification (:mod:`mlx_lora.verify.checks`): ``gelu_table`` (``GELU_TABLE_ARCHS``), keyed by
  the GGUF's ``general.architecture`` (``name``).

The table is keyed by the GGUF architecture (``general.architecture``); one family may cover
several Hugging Face classes and ``model_type`` values (``llama`` also holds Mistral and SmolLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

# GGUF block tensor names (``blk.N.<name>``) the families are made of.
STANDARD_BLOCK = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
QK_NORMS = ("attn_q_norm", "attn_k_norm")
GEMMA_POST_NORMS = ("post_attention_norm", "post_ffw_norm")
PHI3_BLOCK = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Family:
    """One model family: how its GGUF architecture is written (and read back), which Hugging Face
    models belong to it, and which of mlx_lora's own paths (training forward, packed loss,
    planner, GGUF import, verify's tolerances) it takes."""

    # GGUF writer (gguf/arch.py, gguf/writer.py) and reader (model/gguf_import.py)
    name: str  # general.architecture
    arch: gguf.MODEL_ARCH
    block: tuple[str, ...]  # tensors every block must have (``blk.N.<name>.weight``)
    block_bias: tuple[str, ...] = ()  # biases every block must have
    rope_permute: bool = False  # llama: HF rotate-half q/k rows → GGUF interleaved
    norm_shift: float = 0.0  # gemma: HF stores w, llama.cpp multiplies by the stored value
    head_unused: bool = False  # gemma2: llama.cpp always uses token_embd as the output matrix
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")
    vocab_size_key: bool = False  # writer: llama.cpp's llama reads ``{arch}.vocab_size``
    head_size_keys: bool = False  # writer: key/value_length always, not only for a set head_dim

    # which Hugging Face models are this family
    hf_architectures: tuple[str, ...] = ()  # gguf/arch: HF class → family; gguf_import: [0]
    model_types: tuple[str, ...] = ()  # train/plan: config model_type; [0]: mlx_lm.models.<it>

    # which path each stage takes
    fast_forward: bool = False  # train/forward: blocks driven per example (mlx-lm module [0])
    packed_loss: bool = False  # train/loss: packed rows, target-only loss (else model's forward)
    plan_parsed: bool = False  # plan/footprint: shape from config.json (else mlx-lm's classes)
    gguf_import: bool = False  # model/gguf_import: its GGUF files convert to an HF base model
    gelu_table: bool = False  # verify/checks: ggml's f16 GELU table → the f32-gelu tolerance


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        "qwen2",
        gguf.MODEL_ARCH.QWEN2,
        STANDARD_BLOCK,
        ("attn_q", "attn_k", "attn_v"),
        hf_architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        fast_forward=True,
        packed_loss=True,
        plan_parsed=True,
        gguf_import=True,
    ),
    "qwen3": Family(
        "qwen3",
        gguf.MODEL_ARCH.QWEN3,
        STANDARD_BLOCK + QK_NORMS,
        hf_architectures=("Qwen3ForCausalLM",),
        model_types=("qwen3",),
        fast_forward=True,
        packed_loss=True,
        plan_parsed=True,
    ),
    "llama": Family(  # Llama 3.x, Mistral, SmolLM (mlx-lm runs mistral as its llama module)
        "llama",
        gguf.MODEL_ARCH.LLAMA,
        STANDARD_BLOCK,
        rope_permute=True,
        rope_types=("default", "linear", "yarn", "llama3"),
        vocab_size_key=True,
        hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
        model_types=("llama", "mistral"),
        fast_forward=True,
        packed_loss=True,
        plan_parsed=True,
        gguf_import=True,
    ),
    "gemma2": Family(
        "gemma2",
        gguf.MODEL_ARCH.GEMMA2,
        STANDARD_BLOCK + GEMMA_POST_NORMS,
        norm_shift=1.0,
        head_unused=True,
        rope_types=("default",),
        head_size_keys=True,
        hf_architectures=("Gemma2ForCausalLM",),
        model_types=("gemma2",),
        packed_loss=True,
        gelu_table=True,
    ),
    "gemma3": Family(
        "gemma3",
        gguf.MODEL_ARCH.GEMMA3,
        STANDARD_BLOCK + GEMMA_POST_NORMS + QK_NORMS,
        norm_shift=1.0,
        rope_types=("default", "linear"),
        head_size_keys=True,
        hf_architectures=("Gemma3ForCausalLM",),
        model_types=("gemma3_text",),
        packed_loss=True,
        gelu_table=True,
    ),
    "phi3": Family(
        "phi3",
        gguf.MODEL_ARCH.PHI3,
        PHI3_BLOCK,
        rope_types=("default", "linear", "longrope"),
        hf_architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        packed_loss=True,
    ),
}
