"""``python -m mlx_lora.verify``: prove that an export serves the model you trained.

The seed's users found out that their GGUF was wrong by chatting with it in Ollama (wrong tokens,
garbled answers). Each hop is checked here with figures instead:

(a) the GGUF, read back with ``gguf.GGUFReader``, against the Hugging Face folder it came from:
    architecture, block count, every tensor's name and shape, token count, special ids and the
    chat template (and a GGUF LoRA adapter against the PEFT adapter);
(b) tokenization of a fixed set of texts (Chinese, emoji, code, special tokens, newlines, digits)
    by the HF tokenizer and by llama.cpp;
(c) logits of prompts built with :func:`mlx_lora.model.prompt.build_prompt` in MLX (fp32) and in
    llama.cpp (f32 KV cache), plus a greedy continuation; in adapter mode llama.cpp runs the base
    GGUF with the GGUF LoRA adapter and MLX the base with the PEFT adapter;
(d) the fused folder against base + adapter, both in MLX;
(e) the Modelfile: its TEMPLATE executed by Go as Ollama does, the text tokenized by llama.cpp with
    the GGUF's add-BOS rule, against ``apply_chat_template(tokenize=True)`` on 24 conversations
    (needs ``go`` on PATH; skipped with the reason otherwise).

(f) for a quantized GGUF (q8_0 and llama.cpp's types: q4_K_M, q6_K, ...): what quantization cost,
    measured by :mod:`mlx_lora.eval.quality` — perplexity of the quantized GGUF and of the f16/f32
    GGUF it was made from (both through llama.cpp) on held-out text, and their top-1 agreement
    with MLX; the f16/f32 reference itself must match MLX like an f16/f32 export;
(g) an MLX export (``--format mlx``): the folder (``quantization`` entry, tokenizer files), that
    ``mlx_lm.load`` opens it, and its greedy continuation, top-1 and perplexity against the
    full-precision model.

(b), (c), (e) and (f) need llama-cpp-python (``pip install "mlx_lora[verify]"``); without it they
are reported as skipped. Thresholds depend on the GGUF type: f32 must agree within 1e-3; f16 and
bf16 within a rounding budget scaled by the logit range; q8_0 (and the rest) must keep the top-1
token wherever MLX's choice is not a near-tie (llama.cpp's types: measured, see (f)).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_lora.config import opt
from mlx_lora.core.dtypes import DTYPES, config_dtype
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json, scratch_file
from mlx_lora.eval.quality import (
    Quality,
    Row,
    eval_set,
    folder_size,
    gguf_row,
    llama_scores,
    mlx_scores,
)
from mlx_lora.gguf.llamacpp import (
    INSTALL_HINT,
    have_llama_cpp,
    llama_greedy,
    llama_logits,
    llama_tokenize,
    open_llama,
)
from mlx_lora.gguf.quant import reference_type
from mlx_lora.gguf.writer import (
    GGUF_EXPORT_TYPES,
    LLAMA_CPP_TYPES,
    gguf_arch,
    planned_lora_tensors,
    planned_tensors,
    write_gguf,
)
from mlx_lora.model.families import FAMILIES
from mlx_lora.model.hub import resolve_model
from mlx_lora.model.load import load_for_inference
from mlx_lora.model.lora import LoRALinear, merge_weights, read_adapter, set_active
from mlx_lora.model.meta import FUSED_INFO, training_system_prompt
from mlx_lora.model.prompt import (
    TOKENIZER_FILES,
    build_prompt,
    encode_text,
    has_chat_template,
    hf_tokenizer,
    load_hf_tokenizer,
    render,
    with_system,
)
from mlx_lora.verify.manifest import MANIFEST, Manifest
from mlx_lora.verify.template_check import check_modelfile_prompts

# Texts whose tokenization must agree exactly. None starts with whitespace: transformers'
# Metaspace pre-tokenizer skips SentencePiece's dummy prefix there, SentencePiece does not.
TEXTS: tuple[str, ...] = (
    "你好，世界！今天天气怎么样？",
    "嬛嬛，朕今日甚是想念你。",
    "emoji 🦙🚀😶‍🌫️ 👍🏽 ok",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|endoftext|>",
    "line1\nline2\n\n\nline5\r\n",
    "digits 1234567 3.14159 2024-01-01 100%",
    "Hello world! It's 'quoted' and I'll go.",
    "tab\tseparated\tvalues and   spaces",
)

# Probe conversations (rendered with the model's own chat template).
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "你好，请介绍一下你自己。"},),
    ({"role": "user", "content": "Write a Python function that returns the square of x."},),
    (
        {"role": "user", "content": "小主，今天天气如何？"},
        {"role": "assistant", "content": "回禀小主，今日天朗气清。"},
        {"role": "user", "content": "那我们去御花园走走吧 🌸"},
    ),
)
# For models without a chat template (base models such as stories260K): plain text.
PLAIN_PROBES: tuple[str, ...] = (
    "Once upon a time, there was a little girl named Lily.",
    "One day, a big dog came to the park. 你好",
    "The sun was shining and the birds were singing",
)
GREEDY_TOKENS = 32

# Logit tolerance per weight type: (absolute floor, fraction of the largest |logit|).
# f32 differs only in summation order; f16/bf16 round every weight (bf16 eight times coarser);
# q8_0 also quantizes activations, so only the top-1 token is held to account.
TOLERANCES: dict[str, tuple[float, float] | None] = {
    "f32": (1e-3, 0.0),
    "f16": (5e-2, 1e-2),
    "bf16": (2.5e-1, 4e-2),
    "q8_0": None,
    "f32-gelu": (1e-3, 5e-4),  # f32 weights, GELU looked up in ggml's f16 table (see below)
}
# ggml's CPU GELU reads an f16 table (each activation rounded to f16: relative error up to 2^-11,
# which Gemma's post-feed-forward norm scales back up), so at f32 the GELU families differ from
# MLX's exact GELU by more than summation order. Their greedy continuation may then flip a near-tie.
GELU_TABLE_ARCHS = tuple(name for name, f in FAMILIES.items() if f.gelu_table)
TIE_FRACTION_Q = 2e-2  # near-tie width for types without a max|Δ| bound (fraction of max|logit|)


# ----------------------------------------------------------------------------------- report


@dataclass
class Check:
    """One line of the report. ``status``: ok, FAIL, skipped or info (a figure, not a verdict)."""

    name: str
    status: str
    figures: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "figures": self.figures,
            "values": _plain(self.values),
        }


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as JSON numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Report:
    """All checks of one export; ``ok`` is False when any check failed."""

    gguf: Path
    gguf_type: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arch: str | None = None  # general.architecture
    long_rope_ctx: int | None = None  # LongRoPE: context above which llama.cpp uses long factors

    @property
    def logit_kind(self) -> str:
        """The tolerance set for llama.cpp's logits (the GGUF type, GELU families aside)."""
        if self.gguf_type == "f32" and self.arch in GELU_TABLE_ARCHS:
            return "f32-gelu"
        return self.gguf_type

    quality: Any = None  # mlx_lora.eval.quality.Quality for quantized exports

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def get(self, name: str) -> Check:
        """The check whose name starts with ``name`` (names carry counts, like "tokenization (10
        texts)")."""
        for c in self.checks:
            if c.name.startswith(name):
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as data (``export.json``'s ``verify``): what :meth:`table` prints, as rows;
        the quality figures are the manifest's ``quality``."""
        return {
            "target": self.gguf.name,
            "gguf_type": self.gguf_type,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"verify {self.gguf.name} ({self.gguf_type})"]
        for c in self.checks:
            lines.append(f"  {c.name:<{width}}  {c.status:<7}  {c.figures}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.quality is not None:
            lines.append(self.quality.table())
        lines.append(
            "  result: " + ("all checks passed" if self.ok else "MISMATCH (see FAIL lines)")
        )
        return "\n".join(lines)


@dataclass
class Comparison:
    """Logits of one implementation against a reference, over every prompt position."""

    max_abs: float
    top1_equal: int
    positions: int
    top1_wrong: int  # top-1 differs and MLX's choice was not a near-tie
    tolerance: float | None
    tie: float

    @property
    def ok(self) -> bool:
        return self.top1_wrong == 0 and (self.tolerance is None or self.max_abs <= self.tolerance)

    def figures(self) -> str:
        bound = f" (≤ {self.tolerance:.1e})" if self.tolerance is not None else ""
        return f"max|Δlogit| {self.max_abs:.2e}{bound}, top-1 {self.top1_equal}/{self.positions}"

    def values(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "top1_equal": self.top1_equal,
            "positions": self.positions,
            "top1_wrong": self.top1_wrong,
            "tolerance": self.tolerance,
        }


def compare_logits(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], kind: str) -> Comparison:
    """Compare per-prompt logit matrices ``[positions, vocab]`` under the tolerance of ``kind``.

    A top-1 disagreement counts against the check only if the token llama.cpp picked is worse than
    MLX's best by more than the tolerance (or, for quantized types, a small fraction of the logit
    range): near-ties may legitimately flip.
    """
    scale = max(float(np.abs(r).max()) for r in ref)
    rule = TOLERANCES.get(kind)
    tolerance = None if rule is None else rule[0] + rule[1] * scale
    tie = tolerance if tolerance is not None else TIE_FRACTION_Q * max(scale, 1.0)
    max_abs, equal, total, wrong = 0.0, 0, 0, 0
    for r, g in zip(ref, got, strict=True):
        r = np.asarray(r, dtype=np.float32)
        g = np.asarray(g, dtype=np.float32)
        if r.shape != g.shape:
            raise MlxLoraError(
                f"logit shapes differ: {r.shape} vs {g.shape}; the GGUF's vocabulary does not "
                "match the model"
            )
        max_abs = max(max_abs, float(np.abs(r - g).max()))
        top_r, top_g = r.argmax(-1), g.argmax(-1)
        same = top_r == top_g
        equal += int(same.sum())
        total += len(same)
        rows = np.arange(len(r))
        wrong += int((~same & (r[rows, top_r] - r[rows, top_g] > tie)).sum())
    return Comparison(max_abs, equal, total, wrong, tolerance, tie)


# ------------------------------------------------------------------------ (a) metadata read-back


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _gguf_type_of(reader: Any) -> str:
    file_types = {int(ftype): name for name, (_, ftype) in GGUF_EXPORT_TYPES.items()}
    ft = _field(reader, "general.file_type")
    return file_types.get(int(ft), f"file_type {ft}") if ft is not None else "unknown"


def _gguf_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape in numpy order (GGUF stores dimensions innermost first)."""
    return {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in reader.tensors}


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x for x in shape if x != 1) or (1,)


def _tensor_problems(want: dict, got: dict, what: str = "") -> list[str]:
    """Names and shapes of the tensors read back against what the writer plans for the folder."""
    problems = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        problems.append(f"{what}tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [k for k in want if k in got and _squeeze(got[k]) != _squeeze(want[k])]
    if bad:
        k = bad[0]
        problems.append(f"{len(bad)} shape(s) differ, e.g. {k} {got[k]} vs HF {want[k]}")
    return problems


def _vocab_problems(reader: Any, tok: Any, n_vocab: int) -> list[str]:
    """Token count, bos/eos ids and chat template of the GGUF against the HF tokenizer."""
    problems = []
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0
    if n_tokens != n_vocab or len(tok) > n_tokens:
        problems.append(
            f"{n_tokens} GGUF tokens, embedding rows {n_vocab}, HF tokenizer {len(tok)}"
        )
    for key, hf_id in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id)):
        gid = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if hf_id is not None and gid != hf_id:
            problems.append(f"{key} id {gid}, HF {hf_id}")
    template, g_template = (
        getattr(tok, "chat_template", None),
        _field(reader, "tokenizer.chat_template"),
    )
    if isinstance(template, str) and template != g_template:
        problems.append(
            "chat template missing" if g_template is None else "chat template differs from HF's"
        )
    return problems


def _long_rope(reader: Any) -> int | None:
    """The original context of a LongRoPE GGUF (None: no rope_factors_long tensor)."""
    if not any(t.name.startswith("rope_factors_long") for t in reader.tensors):
        return None
    arch = _field(reader, "general.architecture")
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    return int(original) if original is not None else None


def check_metadata(hf_dir: Path, reader: Any, tokenizer: Any) -> Check:
    """(a) The model GGUF against the HF folder it was written from."""
    config = read_json(hf_dir / "config.json", required=True)
    arch, want_arch = _field(reader, "general.architecture"), gguf_arch(config)
    problems = []
    if arch != want_arch:
        problems.append(
            f"architecture {arch!r}, HF {config.get('architectures')} means {want_arch!r}"
        )
    blocks = _field(reader, f"{arch}.block_count")
    if blocks != config.get("num_hidden_layers"):
        problems.append(
            f"block_count {blocks}, HF num_hidden_layers {config.get('num_hidden_layers')}"
        )
    got = _gguf_shapes(reader)
    try:
        want = planned_tensors(hf_dir)
    except MlxLoraError as e:  # not an architecture mlx_lora writes: names cannot be predicted
        want, problems = dict(got), [*problems, f"tensor list not checked ({e})"]
    problems += _tensor_problems(want, got)
    tok = hf_tokenizer(tokenizer)
    n_vocab = want.get("token_embd.weight", (len(tok),))[0]
    problems += _vocab_problems(reader, tok, n_vocab)
    n_tokens = (
        len(reader.fields["tokenizer.ggml.tokens"].data)
        if "tokenizer.ggml.tokens" in reader.fields
        else 0
    )
    template_note = "chat template equal" if has_chat_template(tok) else "no chat template"
    figures = f"{arch}, {blocks} blocks, {len(got)} tensors, {n_tokens} tokens, {template_note}"
    return Check(
        "GGUF read back vs HF folder",
        "FAIL" if problems else "ok",
        "; ".join(problems) if problems else figures,
        {"architecture": arch, "blocks": blocks, "tensors": len(got), "tokens": n_tokens},
    )


def check_lora_metadata(adapter_dir: Path, lora_gguf: Path, base_dir: Path) -> Check:
    """(a) The GGUF LoRA adapter against the PEFT adapter: type, alpha, every A/B pair and shape."""
    import gguf

    reader = gguf.GGUFReader(lora_gguf)
    lora = read_adapter(adapter_dir)
    problems: list[str] = []
    kinds = (_field(reader, "general.type"), _field(reader, "adapter.type"))
    if kinds != ("adapter", "lora"):
        problems.append(f"general.type {kinds[0]!r}, adapter.type {kinds[1]!r}")
    alpha = _field(reader, "adapter.lora.alpha")
    if alpha is None or abs(float(alpha) - lora.alpha) > 1e-6:
        problems.append(f"adapter.lora.alpha {alpha}, adapter_config.json {lora.alpha}")
    got = _gguf_shapes(reader)
    problems += _tensor_problems(planned_lora_tensors(lora, base_dir), got)
    figures = f"{len(got)} tensors (A/B of {len(got) // 2} modules), alpha {alpha:g}"
    return Check(
        "GGUF LoRA adapter vs PEFT adapter",
        "FAIL" if problems else "ok",
        "; ".join(problems) if problems else figures,
        {"tensors": len(got)},
    )


# ----------------------------------------------------------------------------- MLX side


@dataclass
class MlxRun:
    """What the MLX reference produced: probe ids, logits per probe, greedy continuation."""

    prompts: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[int]


def probe_prompts(tokenizer: Any, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of the probes: chat prompts via build_prompt, or plain text without a template."""

    if has_chat_template(tokenizer):
        return [build_prompt(tokenizer, list(p), system_prompt) for p in PROBES]
    tok = hf_tokenizer(tokenizer)
    return [list(tok(t)["input_ids"]) for t in PLAIN_PROBES]


def load_mlx(model_dir: Path, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """fp32 MLX model (+ PEFT adapter) and its tokenizer: the reference llama.cpp must match."""

    loaded = load_for_inference(str(model_dir), adapter_dir, dtype="float32")
    return loaded.model, loaded.tokenizer


def mlx_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of one forward pass in fp32."""
    out = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(out)


def mlx_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from mlx-lm's generation loop (end tokens do not stop it)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(ids), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    )
    return [int(t) for t, _ in steps][:n]


def _free(*_: Any) -> None:
    """Give MLX's buffer cache back before the next model loads (two 4B fp32 models do not fit)."""
    gc.collect()
    mx.clear_cache()


def run_mlx(model: Any, prompts: list[list[int]], greedy_tokens: int) -> MlxRun:
    logits = [mlx_logits(model, p) for p in prompts]
    greedy = mlx_greedy(model, prompts[0], greedy_tokens) if greedy_tokens else []
    return MlxRun(prompts, logits, greedy)


def check_tokenization(gguf_path: Path, tokenizer: Any, texts: Sequence[str] = TEXTS) -> Check:
    """(b) HF tokenizer vs llama.cpp on ``texts``, special tokens parsed as special."""

    llm = open_llama(gguf_path, vocab_only=True)
    bad = []
    for text in texts:
        ours, theirs = encode_text(tokenizer, text), llama_tokenize(llm, text)
        if ours != theirs:
            bad.append((text, ours, theirs))
    del llm
    same = len(texts) - len(bad)
    figures = f"{same}/{len(texts)} texts identical"
    if bad:
        text, ours, theirs = bad[0]
        figures += f"; e.g. {text[:30]!r}: HF {ours[:8]}… llama.cpp {theirs[:8]}…"
    return Check(
        f"tokenization ({len(texts)} texts)",
        "FAIL" if bad else "ok",
        figures,
        {"identical": same, "total": len(texts)},
    )


def check_chat_tokenization(gguf_path: Path, tokenizer: Any, system: str | None) -> Check | None:
    """The probe chats rendered to text, tokenized by llama.cpp (as Ollama tokenizes the text
    its TEMPLATE renders) and by HF. A figure, not a verdict: verify feeds llama.cpp the ids MLX
    used, so logits agree either way; a difference here (e.g. SentencePiece's space prefix after
    a special token) means Ollama's chat input differs from the training input."""

    if not has_chat_template(tokenizer):
        return None
    texts = [
        render(tokenizer, with_system(list(p), system), add_generation_prompt=True) for p in PROBES
    ]
    check = check_tokenization(gguf_path, tokenizer, texts)
    check.name = f"chat prompts as text ({len(texts)})"
    check.status = "ok" if check.status == "ok" else "info"
    return check


# --------------------------------------------------------------------------------- verify


def _check_inputs(
    paths: Sequence[Path | None], adapter_dir: Path | None, lora: Path | None
) -> None:
    for p in paths:
        if p is not None and not Path(p).exists():
            raise MlxLoraError(
                f"{p} does not exist; pass the files an export wrote (or run python -m "
                "mlx_lora.export first)"
            )
    if lora is not None and adapter_dir is None:
        raise MlxLoraError(
            "verifying a GGUF LoRA adapter needs the PEFT adapter it came from (--adapter)"
        )


def _check_fused(
    report: Report, hf_dir: Path, adapter_dir: Path, base_dir: Path | None, ref: MlxRun
) -> None:
    """(d) the fused folder's logits against base + adapter, both in MLX at fp32.

    A 16-bit fused folder stores ``W + s·B·A`` rounded to its dtype, which moves the logits of a
    deep model by more than any fixed bound (SmolLM2, 30 blocks: 2 in bf16). So the check is
    split where nothing is approximate: the stored weights against the merge rounded the same way
    (equal weights: the f32 bound), and the merge itself against the LoRA layers (f32 bound).
    """
    if base_dir is None:
        recorded = read_adapter(adapter_dir).base_model
        if recorded is None:
            msg = "the adapter records no base model; pass --base"
            report.checks.append(Check("fused vs base+adapter (MLX)", "skipped", msg))
            return
        base_dir = resolve_model(recorded)
    fused_dtype = config_dtype(read_json(hf_dir / "config.json"), "float32")
    base_model, _ = load_mlx(Path(base_dir), adapter_dir)
    adapter = read_adapter(adapter_dir)
    lora_logits = [mlx_logits(base_model, p) for p in ref.prompts]
    stored = DTYPES.get(fused_dtype, mx.float32)
    rounded = _merged_logits(base_model, adapter, ref.prompts, stored)
    exact = rounded if stored == mx.float32 else _merged_logits(base_model, adapter, ref.prompts)
    del base_model
    _free()
    weights = compare_logits(rounded, ref.logits, "f32")
    merge = compare_logits(lora_logits, exact, "f32")
    moved = compare_logits(lora_logits, ref.logits, fused_dtype.replace("float", "f"))
    figures = (
        f"stored weights vs the merge rounded to {fused_dtype}: {weights.figures()}; "
        f"merge vs LoRA layers: {merge.figures()}"
    )
    if stored != mx.float32:
        figures += f"; rounding to {fused_dtype} moves the logits by {moved.max_abs:.2e}"
    name = f"fused ({fused_dtype}) vs base+adapter (MLX)"
    ok = weights.ok and merge.ok
    values = {**moved.values(), "stored": weights.values(), "merge": merge.values()}
    report.checks.append(Check(name, "ok" if ok else "FAIL", figures, values))


def _merged_logits(
    model: Any, adapter: Any, prompts: list[list[int]], dtype: Any = None
) -> list[np.ndarray]:
    """Logits with every LoRA layer folded by :func:`merge_weights` (the merge fuse writes),
    rounded to ``dtype`` as fuse stores it (None: kept in fp32)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    originals = {name: m.base.weight for name, m in layers.items()}
    base = {f"{name}.weight": np.array(w) for name, w in originals.items()}
    merged = merge_weights(base, adapter, list(layers))
    try:
        for name, m in layers.items():
            w = mx.array(merged[f"{name}.weight"])
            m.base.weight = w if dtype is None else w.astype(dtype).astype(mx.float32)
        set_active(model, False)
        return [mlx_logits(model, p) for p in prompts]
    finally:
        for name, m in layers.items():
            m.base.weight = originals[name]
        set_active(model, True)


def _greedy_check(ref: MlxRun, theirs: list[int], kind: str) -> Check:
    """Only f32 must reproduce the continuation; rounded weights may flip a near-tie and diverge."""
    n = len(ref.greedy)
    pairs = zip(ref.greedy, theirs, strict=True)
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(theirs))
    identical = theirs == ref.greedy
    status = "ok" if identical else ("FAIL" if kind == "f32" else "info")
    figures = f"{n} tokens identical" if identical else f"first {same} of {n} tokens identical"
    values = {"mlx": ref.greedy, "llama_cpp": theirs, "identical_prefix": same}
    return Check(f"greedy {n} tokens", status, figures, values)


def check_modelfile_template(modelfile: Path, gguf_path: Path, tokenizer: Any) -> Check:
    """(e) Ollama's prompt ids for the Modelfile (TEMPLATE run by Go, llama.cpp tokenization with
    the GGUF's add-BOS rule) against the HF chat template's, on every check conversation."""

    name = "Modelfile template vs HF template"
    r = check_modelfile_prompts(Path(modelfile), Path(gguf_path), tokenizer, PLAIN_PROBES)
    if r.skipped:
        return Check(name, "skipped", r.skipped)
    figures = f"{r.identical}/{r.total} {r.unit} identical"
    if r.example:
        figures += f"; e.g. {r.example}"
    values = {"identical": r.identical, "total": r.total, "unit": r.unit}
    return Check(name, "ok" if r.ok else "FAIL", figures, values)


def _check_llama(
    report: Report,
    gguf_path: Path,
    lora_gguf: Path | None,
    tokenizer: Any,
    ref: MlxRun,
    modelfile: Path | None = None,
    system: str | None = None,
) -> None:
    """(b) tokenization, (e) the Modelfile's prompts, (c) logits and greedy continuation."""
    if not have_llama_cpp():
        names = ["tokenization", "logits llama.cpp vs MLX"]
        if modelfile is not None:
            names.insert(1, "Modelfile template vs HF template")
        for name in names:
            report.checks.append(
                Check(name, "skipped", f"llama-cpp-python is not installed: {INSTALL_HINT}")
            )
        report.notes.append(f"llama.cpp checks skipped; get them with {INSTALL_HINT}")
        return
    report.checks.append(check_tokenization(gguf_path, tokenizer))
    if modelfile is not None:
        report.checks.append(check_modelfile_template(modelfile, gguf_path, tokenizer))
    chat = check_chat_tokenization(gguf_path, tokenizer, system)
    if chat is not None:
        report.checks.append(chat)
    n_ctx = max(len(p) for p in ref.prompts) + len(ref.greedy) + 8
    if report.long_rope_ctx is not None:  # mlx-lm applies LongRoPE's long factors at any length
        n_ctx = max(n_ctx, report.long_rope_ctx + 1)
        report.notes.append(
            f"LongRoPE: llama.cpp run with a {n_ctx}-token context, where it uses the long "
            "factors as mlx-lm always does (below that context llama.cpp, like HF, uses the short "
            "ones)"
        )
    llm = open_llama(gguf_path, n_ctx=n_ctx, lora_path=Path(lora_gguf) if lora_gguf else None)
    kind = report.logit_kind
    if kind != report.gguf_type:
        report.notes.append(
            f"{report.arch}: llama.cpp computes GELU through an f16 table, so the f32 bound adds "
            f"{TOLERANCES[kind][1]:g} x max|logit|"
        )
    cmp = compare_logits(ref.logits, [llama_logits(llm, p) for p in ref.prompts], kind)
    what = "llama.cpp base+LoRA vs MLX base+adapter" if lora_gguf else "logits llama.cpp vs MLX"
    name = f"{what} ({len(ref.prompts)} prompts)"
    status, figures = ("ok" if cmp.ok else "FAIL"), cmp.figures()
    if not cmp.ok and report.gguf_type in LLAMA_CPP_TYPES:  # measured below, not a verdict
        status, figures = "info", figures + " (llama.cpp's quantization; see quality)"
    report.checks.append(Check(name, status, figures, cmp.values()))
    if ref.greedy:
        theirs = llama_greedy(llm, ref.prompts[0], len(ref.greedy))
        report.checks.append(_greedy_check(ref, theirs, kind))


QUANTIZED_SKIP = ("f32", "f16", "bf16")  # the references themselves: no quality section


def _run_adapter(hf_dir: Path, lora: Any) -> Any:
    """The adapter whose run recorded the validation split: given, or named by fuse's record."""
    if lora is not None:
        return lora
    recorded = read_json(hf_dir / FUSED_INFO).get("adapter")
    if recorded and Path(recorded).is_dir():
        try:
            return read_adapter(Path(recorded))
        except MlxLoraError:
            return None
    return None


def _quality_gguf(
    report: Report,
    gguf_path: Path,
    lora_gguf: Path | None,
    hf_dir: Path,
    evals: Any,
    mlx: Any,
    ref: MlxRun,
    reference_gguf: Path | None,
) -> None:
    """(e) the quantized GGUF and its f16/f32 reference, both through llama.cpp, against MLX."""

    ref_type = reference_type(hf_dir)
    lora = Path(lora_gguf) if lora_gguf else None
    with ExitStack() as stack:
        if reference_gguf is None or not Path(reference_gguf).is_file():
            reference_gguf = stack.enter_context(scratch_file(gguf_path, "reference"))
            write_gguf(hf_dir, reference_gguf, ref_type, progress=False)
        n_ctx = max(len(x) for x in ref.prompts) + 8
        llm = open_llama(Path(reference_gguf), n_ctx=n_ctx, lora_path=lora)
        kind = "f16" if lora else ref_type  # a quantized base's GGUF LoRA adapter is f16
        if kind == "f32" and report.arch in GELU_TABLE_ARCHS:
            kind = "f32-gelu"  # llama.cpp's GELU lookup table, as for an f32 export
        cmp = compare_logits(ref.logits, [llama_logits(llm, x) for x in ref.prompts], kind)
        del llm
        what = f"reference {ref_type} GGUF{' + LoRA' if lora else ''} vs MLX"
        name = f"{what} ({len(ref.prompts)} prompts)"
        report.checks.append(Check(name, "ok" if cmp.ok else "FAIL", cmp.figures(), cmp.values()))
        rows = [
            gguf_row(
                gguf_path.name, report.gguf_type, gguf_path, llama_scores(gguf_path, evals, lora)
            ),
            gguf_row(
                f"{ref_type} reference",
                ref_type,
                Path(reference_gguf),
                llama_scores(Path(reference_gguf), evals, lora),
                reference=True,
            ),
        ]
    report.quality = Quality(
        evals, rows, mlx, "MLX fp32 (" + ("base+adapter" if lora else "model") + ")"
    )


def verify_gguf(
    hf_dir: Path,
    gguf_path: Path,
    *,
    adapter_dir: Path | None = None,
    base_dir: Path | None = None,
    gguf_type: str | None = None,
    lora_gguf: Path | None = None,
    greedy_tokens: int = GREEDY_TOKENS,
    modelfile: Path | None = None,
    eval_data: Path | None = None,
    reference_gguf: Path | None = None,
) -> Report:
    """Check a GGUF export against the MLX model it stands for.

    Full mode: ``hf_dir`` is the folder the GGUF was written from (the fused folder, or the base
    when nothing was fused); with ``adapter_dir`` (and ``base_dir``, default: the adapter's
    recorded base) the fused folder is also compared with base + adapter in MLX. Adapter mode
    (``lora_gguf`` set): ``hf_dir`` is the base, ``gguf_path`` its GGUF, and llama.cpp's base +
    LoRA is compared with MLX's base + ``adapter_dir``. ``gguf_type`` defaults to the GGUF's own.
    With ``modelfile``, the prompts Ollama builds from it are compared with the chat template's.
    A quantized GGUF also gets the quality section (held-out text: ``eval_data``, else the run's
    validation split); ``reference_gguf`` is the f16/f32 GGUF it was made from, if still at hand.
    """
    import gguf

    hf_dir, gguf_path = Path(hf_dir), Path(gguf_path)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    _check_inputs((hf_dir, gguf_path, adapter_dir, lora_gguf, modelfile), adapter_dir, lora_gguf)
    reader = gguf.GGUFReader(gguf_path)
    report = Report(gguf_path, gguf_type or _gguf_type_of(reader))
    report.arch, report.long_rope_ctx = _field(reader, "general.architecture"), _long_rope(reader)
    # The MLX reference: what llama.cpp must reproduce (in adapter mode: base + PEFT adapter).
    model, tokenizer = load_mlx(hf_dir, adapter_dir if lora_gguf is not None else None)
    report.checks.append(check_metadata(hf_dir, reader, tokenizer))
    del reader
    if lora_gguf is not None:
        report.checks.append(check_lora_metadata(adapter_dir, Path(lora_gguf), hf_dir))
    lora = read_adapter(adapter_dir) if adapter_dir is not None else None
    system = training_system_prompt(hf_dir, lora)
    prompts = probe_prompts(tokenizer, system)
    ref = run_mlx(model, prompts, greedy_tokens)
    evals = mlx = None
    if report.gguf_type not in QUANTIZED_SKIP and have_llama_cpp():
        run = _run_adapter(hf_dir, lora)
        evals = eval_set(tokenizer, adapter=run, eval_data=eval_data, system_prompt=system)
        mlx = mlx_scores(model, evals)
    del model
    _free()
    if adapter_dir is not None and lora_gguf is None:
        _check_fused(report, hf_dir, adapter_dir, base_dir, ref)
    elif (hf_dir / FUSED_INFO).is_file() and lora_gguf is None:
        report.notes.append("fused vs base+adapter not checked: pass the adapter (--adapter)")
    _check_llama(report, gguf_path, lora_gguf, tokenizer, ref, modelfile, system)
    if evals is not None:
        _quality_gguf(report, gguf_path, lora_gguf, hf_dir, evals, mlx, ref, reference_gguf)
    return report


def verify_mlx(
    hf_dir: Path,
    mlx_dir: Path,
    *,
    bits: int,
    group_size: int,
    adapter_dir: Path | None = None,
    eval_data: Path | None = None,
    greedy_tokens: int = GREEDY_TOKENS,
) -> Report:
    """(f) An MLX export against the full-precision model it was quantized from, both in MLX."""

    hf_dir, mlx_dir = Path(hf_dir), Path(mlx_dir)
    _check_inputs((hf_dir, mlx_dir, adapter_dir), None, None)
    report = Report(mlx_dir, f"mlx {bits}-bit")
    problems = mlx_folder_problems(mlx_dir, hf_dir, bits, group_size)
    report.checks.append(
        Check(
            "MLX folder (config, tokenizer files)",
            "FAIL" if problems else "ok",
            "; ".join(problems)
            or f"bits {bits}, group size {group_size}, tokenizer files identical",
        )
    )
    report.checks.append(_check_mlx_load(mlx_dir, hf_dir))
    if report.checks[-1].status == "FAIL":
        return report
    lora = read_adapter(Path(adapter_dir)) if adapter_dir is not None else None
    model, tokenizer = load_mlx(hf_dir)
    system = training_system_prompt(hf_dir, lora)
    prompts = probe_prompts(tokenizer, system)
    evals = eval_set(
        tokenizer, adapter=_run_adapter(hf_dir, lora), eval_data=eval_data, system_prompt=system
    )
    full, ref = mlx_scores(model, evals), run_mlx(model, prompts[:1], greedy_tokens)
    del model
    _free()
    quant, _ = load_quantized(mlx_dir)
    got, ours = mlx_scores(quant, evals), mlx_greedy(quant, prompts[0], greedy_tokens)
    bpw = _bits_per_weight(quant)
    del quant
    _free()
    check = _greedy_check(ref, ours, "mlx")
    check.name = f"greedy {len(ref.greedy)} tokens vs full precision (MLX)"
    report.checks.append(check)
    agree = got.agreement(full)
    report.checks.append(
        Check(
            "top-1 vs full precision (MLX)",
            "info",
            f"{100 * agree:.1f}% of {sum(len(t) for t in got.top1)} positions",
            {"top1_agreement": agree},
        )
    )
    q = read_json(mlx_dir / "config.json").get("quantization") or {}
    rows = [
        Row(mlx_dir.name, f"mlx {q.get('bits')}-bit", got, folder_size(mlx_dir), bpw),
        Row("full precision", "fp32", full, folder_size(hf_dir), reference=True),
    ]
    report.quality = Quality(evals, rows, full, "MLX fp32 (top-1 referee)")
    return report


def _check_mlx_load(mlx_dir: Path, hf_dir: Path) -> Check:
    """The contract: ``mlx_lm.load`` opens the folder unchanged, with the model's chat template."""
    from mlx_lm.utils import load as mlx_lm_load

    name = "mlx_lm.load opens it"
    try:
        model, tok = mlx_lm_load(str(mlx_dir))
    except Exception as e:  # noqa: BLE001 - whatever mlx-lm raises is the finding
        return Check(name, "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
    del model
    _free()
    ours = getattr(hf_tokenizer(tok), "chat_template", None)
    same = ours == getattr(load_hf_tokenizer(hf_dir), "chat_template", None)
    figures = "chat template equal" if same else "chat template differs from the model's"
    if same and ours is None:
        figures = "no chat template (as the model)"
    return Check(name, "ok" if same else "FAIL", figures)


def _bits_per_weight(model: Any) -> float:
    from mlx_lm.utils import compute_bits_per_weight

    return float(compute_bits_per_weight(model))


def load_quantized(mlx_dir: Path) -> tuple[Any, Any]:
    """An MLX folder as chat and serve load it (its own dtype: what mlx_lm runs)."""

    loaded = load_for_inference(str(mlx_dir))
    return loaded.model, loaded.tokenizer


def verify_export(
    export: Any, *, reference_gguf: Path | None = None, eval_data: Path | None = None
) -> Report:
    """Verify an export folder (or an :class:`mlx_lora.export.pipeline.ExportResult`) from its
    manifest; the report (:meth:`Report.to_dict`) and the quality figures are added to its
    ``export.json``."""
    out = Path(getattr(export, "output_dir", export))
    m = Manifest.read(out)

    def path(key: str) -> Path | None:
        return m.path(out, key)

    if m.format == "mlx":
        q = m.quantization or {}
        report = verify_mlx(
            path("hf_dir"),
            path("mlx_dir"),
            bits=q.get("bits", 4),
            group_size=q.get("group_size", 64),
            adapter_dir=path("adapter"),
            eval_data=eval_data or path("eval_data"),
        )
    else:
        report = verify_gguf(
            path("hf_dir"),
            path("gguf"),
            adapter_dir=path("adapter"),
            base_dir=path("base_dir"),
            gguf_type=m.gguf_type,
            lora_gguf=path("lora_gguf"),
            modelfile=path("modelfile"),
            eval_data=eval_data or path("eval_data"),
            reference_gguf=reference_gguf,
        )
    if report.quality is not None:
        m.quality = report.quality.to_json()
    m.verify = report.to_dict()
    try:
        m.write(out)
    except (OSError, MlxLoraError) as e:  # a read-only export is still verified; say so
        report.notes.append(f"not recorded in {out / MANIFEST} ({e})")
    return report


def mlx_folder_problems(mlx_dir: Path, hf_dir: Path, bits: int, group_size: int) -> list[str]:
    """What ``verify`` checks in the folder itself: the quantization entry and the byte-identical
    tokenizer files and chat template."""
    problems = []
    q = read_json(Path(mlx_dir) / "config.json").get("quantization") or {}
    if q.get("bits") != bits or q.get("group_size") != group_size:
        problems.append(
            f"config.json quantization {q or 'missing'}, expected bits {bits}, group {group_size}"
        )
    for name in TOKENIZER_FILES:
        a, b = Path(hf_dir) / name, Path(mlx_dir) / name
        if a.is_file() and name != "tokenizer_config.json":
            if not b.is_file() or a.read_bytes() != b.read_bytes():
                problems.append(f"{name} differs from {hf_dir}")
    return problems


# ------------------------------------------------------------------------------------ CLI


@dataclass
class VerifyConfig:
    export_dir: str | None = opt(
        None,
        "an export folder (python -m mlx_lora.export --output-dir): verify everything it lists",
    )
    gguf: str | None = opt(None, "the GGUF to check (instead of --export-dir)")
    hf_dir: str | None = opt(
        None,
        "the Hugging Face folder the GGUF was written from (fused folder, or the base in adapter "
        "mode)",
    )
    adapter: str | None = opt(
        None, "the PEFT adapter: fused folder vs base+adapter, or the source of --lora-gguf"
    )
    base: str | None = opt(
        None,
        "base model folder for the fused vs base+adapter check (default: the adapter's recorded "
        "base)",
    )
    lora_gguf: str | None = opt(
        None, "a GGUF LoRA adapter to apply on top of --gguf (adapter mode)"
    )
    gguf_type: str | None = opt(
        None,
        "threshold set to use (default: the GGUF's own file type)",
        choices=list(GGUF_EXPORT_TYPES),
    )
    modelfile: str | None = opt(
        None,
        "an Ollama Modelfile for --gguf: its TEMPLATE run by Go as Ollama does, tokenized by "
        "llama.cpp, vs the chat template (needs go on PATH)",
    )
    eval_data: str | None = opt(
        None,
        "held-out texts (a dataset file) for the quality section of a quantized export; default: "
        "the one export recorded, else the training run's validation split",
    )
