"""``python -m mlx_lora.verify``: prove that an export serves the model you trained.

The seed's users found out that their GGUF was wrong by chatting with it in Ollama (wrong tokens,
garbled answers). Each hop is checked here with figures instead:

(a) the GGUF, read back with ``gguf.GGUFReader``, against the Hugging Face folder it came from:
    architecture, block count, every tensor's name and shape, token count, special ids and the
    chat template (and a GGUF LoRA adapter against the PEFT adapter);
(b) tokenization of a fixed set of texts (Chinese, emoji, code, special tokens, newlines, digits)
    by the HF tokenizer and by llama.cpp;
(c) logits of prompts built with :func:`mlx_lora.prompt.build_prompt` in MLX (fp32) and in
    llama.cpp (f32 KV cache), plus a greedy continuation; in adapter mode llama.cpp runs the base
    GGUF with the GGUF LoRA adapter and MLX the base with the PEFT adapter;
(d) the fused folder against base + adapter, both in MLX.

(b) and (c) need llama-cpp-python (``pip install "mlx_lora[verify]"``); without it they are
reported as skipped. Thresholds depend on the GGUF type: f32 must agree within 1e-3; f16 and bf16
within a rounding budget scaled by the logit range; q8_0 (and the rest) must keep the top-1 token
wherever MLX's choice is not a near-tie.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.config import opt, parse_config
from mlx_lora.errors import MlxLoraError

EXPORT_MANIFEST = "export.json"
INSTALL_HINT = 'pip install "mlx_lora[verify]"'

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
}
TIE_FRACTION_Q = 2e-2  # near-tie width for types without a max|Δ| bound (fraction of max|logit|)

_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}
_DTYPE_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def have_llama_cpp() -> bool:
    """Whether llama-cpp-python is importable (the optional ``verify`` extra)."""
    return importlib.util.find_spec("llama_cpp") is not None


# ----------------------------------------------------------------------------------- report


@dataclass
class Check:
    """One line of the report. ``status``: ok, FAIL, skipped or info (a figure, not a verdict)."""

    name: str
    status: str
    figures: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """All checks of one export; ``ok`` is False when any check failed."""

    gguf: Path
    gguf_type: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def get(self, name: str) -> Check:
        """The check whose name starts with ``name`` (names carry counts, e.g. "tokenization (10 texts)")."""
        for c in self.checks:
            if c.name.startswith(name):
                return c
        raise KeyError(name)

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"verify {self.gguf.name} ({self.gguf_type})"]
        for c in self.checks:
            lines.append(f"  {c.name:<{width}}  {c.status:<7}  {c.figures}")
        lines += [f"  note: {n}" for n in self.notes]
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


def _st_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an HF checkpoint, from the safetensors headers (no data read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with open(folder / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = tuple(v["shape"])
    return shapes


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _arch_enum(arch: str) -> Any:
    import gguf

    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise MlxLoraError(f"unknown GGUF architecture {arch!r}")


def _expected_arch(config: dict) -> str | None:
    from mlx_lora.gguf import SUPPORTED_ARCHITECTURES

    archs = config.get("architectures") or [None]
    return SUPPORTED_ARCHITECTURES.get(archs[0])


def _gguf_type_of(reader: Any) -> str:
    ft = _field(reader, "general.file_type")
    return _FILE_TYPES.get(int(ft), f"file_type {ft}") if ft is not None else "unknown"


def check_metadata(hf_dir: Path, reader: Any, tokenizer: Any) -> Check:
    """(a) The model GGUF against the HF folder it was written from."""
    problems: list[str] = []
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = _field(reader, "general.architecture")
    want_arch = _expected_arch(config)
    if arch != want_arch:
        problems.append(
            f"architecture {arch!r}, HF {config.get('architectures')} means {want_arch!r}"
        )
    n_layers = config.get("num_hidden_layers")
    blocks = _field(reader, f"{arch}.block_count")
    if blocks != n_layers:
        problems.append(f"block_count {blocks}, HF num_hidden_layers {n_layers}")

    import gguf

    expected: dict[str, tuple[int, ...]] = {}
    if want_arch is not None and isinstance(n_layers, int):
        tmap = gguf.get_tensor_name_map(_arch_enum(want_arch), n_layers)
        for name, shape in _st_shapes(hf_dir).items():
            if name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias")):
                continue
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            expected[gname or name] = shape
    got = {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in reader.tensors}
    got_model = {k: v for k, v in got.items() if k != "rope_freqs.weight"}
    missing = sorted(set(expected) - set(got_model))
    extra = sorted(set(got_model) - set(expected))
    if missing or extra:
        problems.append(f"tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
    bad_shapes = [k for k in expected if k in got and _squeeze(got[k]) != _squeeze(expected[k])]
    if bad_shapes:
        k = bad_shapes[0]
        problems.append(
            f"{len(bad_shapes)} tensor shape(s) differ, e.g. {k} {got[k]} vs HF {expected[k]}"
        )

    from mlx_lora.prompt import hf_tokenizer

    tok = hf_tokenizer(tokenizer)
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens_field.data) if tokens_field is not None else 0
    n_vocab = expected.get("token_embd.weight", (len(tok),))[0]
    if n_tokens != n_vocab or len(tok) > n_tokens:
        problems.append(
            f"{n_tokens} GGUF tokens, embedding rows {n_vocab}, HF tokenizer {len(tok)}"
        )
    for key, hf_id in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id)):
        gid = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if hf_id is not None and gid != hf_id:
            problems.append(f"{key} id {gid}, HF {hf_id}")
    template = getattr(tok, "chat_template", None)
    g_template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template != g_template:
        problems.append(
            "chat template missing"
            if g_template is None
            else "chat template differs from tokenizer_config.json's"
        )
    template_note = "chat template equal" if isinstance(template, str) else "no chat template"

    figures = (
        f"{arch}, {blocks} blocks, {len(got)} tensors, {n_tokens} tokens, {template_note}"
        if not problems
        else "; ".join(problems)
    )
    return Check(
        "GGUF read back vs HF folder",
        "FAIL" if problems else "ok",
        figures,
        {"architecture": arch, "blocks": blocks, "tensors": len(got), "tokens": n_tokens},
    )


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x for x in shape if x != 1) or (1,)


def check_lora_metadata(adapter_dir: Path, lora_gguf: Path, base_config: dict) -> Check:
    """(a) The GGUF LoRA adapter against the PEFT adapter: type, alpha, every A/B pair and shape."""
    import gguf

    reader = gguf.GGUFReader(lora_gguf)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problems: list[str] = []
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        problems.append(
            f"general.type {_field(reader, 'general.type')!r}, adapter.type "
            f"{_field(reader, 'adapter.type')!r}"
        )
    alpha = _field(reader, "adapter.lora.alpha")
    if alpha is None or abs(float(alpha) - float(acfg["lora_alpha"])) > 1e-6:
        problems.append(f"adapter.lora.alpha {alpha}, adapter_config.json {acfg['lora_alpha']}")
    arch = _expected_arch(base_config)
    tmap = (
        gguf.get_tensor_name_map(_arch_enum(arch), base_config["num_hidden_layers"])
        if arch
        else None
    )
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in _st_shapes_file(adapter_dir / "adapter_model.safetensors").items():
        module, _, part = name.rpartition(".lora_")
        module = module.removeprefix("base_model.model.")
        gname = tmap.get_name(module + ".weight", try_suffixes=(".weight",)) if tmap else None
        expected[f"{gname or module}.lora_{part[0].lower()}"] = shape
    got = {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in reader.tensors}
    if set(got) != set(expected):
        problems.append(
            f"tensors differ: missing {sorted(set(expected) - set(got))[:3]}, unexpected "
            f"{sorted(set(got) - set(expected))[:3]}"
        )
    bad = [k for k in expected if k in got and got[k] != expected[k]]
    if bad:
        problems.append(
            f"{len(bad)} shape(s) differ, e.g. {bad[0]} {got[bad[0]]} vs {expected[bad[0]]}"
        )
    figures = (
        f"{len(got)} tensors (A/B of {len(got) // 2} modules), alpha {alpha:g}"
        if not problems
        else "; ".join(problems)
    )
    return Check(
        "GGUF LoRA adapter vs PEFT adapter",
        "FAIL" if problems else "ok",
        figures,
        {"tensors": len(got)},
    )


def _st_shapes_file(path: Path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


# ----------------------------------------------------------------------------- MLX side


@dataclass
class MlxRun:
    """What the MLX reference produced: probe ids, logits per probe, greedy continuation."""

    prompts: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[int]


def probe_prompts(tokenizer: Any, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of the probes: chat prompts via build_prompt, or plain text without a template."""
    from mlx_lora.prompt import build_prompt, has_chat_template, hf_tokenizer

    if has_chat_template(tokenizer):
        return [build_prompt(tokenizer, list(p), system_prompt) for p in PROBES]
    tok = hf_tokenizer(tokenizer)
    return [list(tok(t)["input_ids"]) for t in PLAIN_PROBES]


def load_mlx(model_dir: Path, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """fp32 MLX model (+ PEFT adapter) and its tokenizer."""
    import mlx.core as mx

    from mlx_lora.lora import load_adapter
    from mlx_lora.model import load_base

    model, tok, _ = load_base(Path(model_dir), dtype=mx.float32)
    if adapter_dir is not None:
        load_adapter(model, Path(adapter_dir))
    model.eval()
    return model, tok


def mlx_logits(model: Any, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of one forward pass in fp32."""
    import mlx.core as mx

    out = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(out)


def mlx_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from mlx-lm's generation loop (end tokens do not stop it)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(ids), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    )
    return [int(t) for t, _ in steps][:n]


def _free(*_: Any) -> None:
    """Give MLX's buffer cache back before the next model loads (two 4B fp32 models do not fit)."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def run_mlx(model: Any, prompts: list[list[int]], greedy_tokens: int) -> MlxRun:
    logits = [mlx_logits(model, p) for p in prompts]
    greedy = mlx_greedy(model, prompts[0], greedy_tokens) if greedy_tokens else []
    return MlxRun(prompts, logits, greedy)


# ------------------------------------------------------------------------- llama.cpp side


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
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
    """A llama-cpp-python model: f32 KV cache when the binding allows it, logits for every position."""
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
    with _quiet_stderr():
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
    with _quiet_stderr():
        llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    with _quiet_stderr():
        llm.eval(ids)
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
    return out


def llama_tokenize(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def check_tokenization(gguf_path: Path, tokenizer: Any, texts: Sequence[str] = TEXTS) -> Check:
    """(b) HF tokenizer vs llama.cpp on ``texts``, special tokens parsed as special."""
    from mlx_lora.prompt import encode_text

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


# --------------------------------------------------------------------------------- verify


def _system_prompt(model_dir: Path, adapter_dir: Path | None) -> str | None:
    """The system prompt the model was trained with (adapter config, or a fused folder's record)."""
    sources = []
    if adapter_dir is not None:
        sources.append((Path(adapter_dir) / "adapter_config.json", "mlx_lora"))
    sources.append((Path(model_dir) / "mlx_lora.json", None))
    for path, section in sources:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data = (data.get(section) or {}) if section else data
            if data.get("system_prompt"):
                return data["system_prompt"]
    return None


def verify_gguf(
    hf_dir: Path,
    gguf_path: Path,
    *,
    adapter_dir: Path | None = None,
    base_dir: Path | None = None,
    gguf_type: str | None = None,
    lora_gguf: Path | None = None,
    greedy_tokens: int = GREEDY_TOKENS,
) -> Report:
    """Check a GGUF export against the MLX model it stands for.

    Full mode: ``hf_dir`` is the folder the GGUF was written from (the fused folder, or the base
    when nothing was fused); with ``adapter_dir`` (and ``base_dir``, default: the adapter's
    recorded base) the fused folder is also compared with base + adapter in MLX. Adapter mode
    (``lora_gguf`` set): ``hf_dir`` is the base, ``gguf_path`` its GGUF, and llama.cpp's base +
    LoRA is compared with MLX's base + ``adapter_dir``. ``gguf_type`` defaults to the GGUF's own.
    """
    import gguf

    hf_dir, gguf_path = Path(hf_dir), Path(gguf_path)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    for p in (hf_dir, gguf_path, adapter_dir, lora_gguf):
        if p is not None and not Path(p).exists():
            raise MlxLoraError(
                f"{p} does not exist; pass the files an export wrote (or run python -m "
                "mlx_lora.export first)"
            )
    if lora_gguf is not None and adapter_dir is None:
        raise MlxLoraError(
            "verifying a GGUF LoRA adapter needs the PEFT adapter it came from (--adapter)"
        )
    reader = gguf.GGUFReader(gguf_path)
    kind = gguf_type or _gguf_type_of(reader)
    report = Report(gguf_path, kind)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    system = _system_prompt(hf_dir, adapter_dir)

    # The MLX reference: what llama.cpp must reproduce.
    ref_adapter = adapter_dir if lora_gguf is not None else None
    model, tokenizer = load_mlx(hf_dir, ref_adapter)
    report.checks.append(check_metadata(hf_dir, reader, tokenizer))
    del reader
    if lora_gguf is not None:
        report.checks.append(check_lora_metadata(adapter_dir, Path(lora_gguf), config))
    prompts = probe_prompts(tokenizer, system)
    ref = run_mlx(model, prompts, greedy_tokens)
    del model
    _free()

    # (d) fused ≡ base + adapter, in MLX
    fused_dir = hf_dir if (hf_dir / "mlx_lora.json").is_file() else None
    if adapter_dir is not None and lora_gguf is None:
        if base_dir is None:
            from mlx_lora.hub import resolve_model
            from mlx_lora.model import adapter_base

            recorded = adapter_base(adapter_dir)
            base_dir = resolve_model(recorded) if recorded else None
        if base_dir is None:
            report.checks.append(
                Check(
                    "fused vs base+adapter (MLX)",
                    "skipped",
                    "the adapter records no base model; pass --base",
                )
            )
        else:
            fused_dtype = str(config.get("torch_dtype") or "float32")
            base_model, _ = load_mlx(Path(base_dir), adapter_dir)
            base_logits = [mlx_logits(base_model, p) for p in prompts]
            del base_model
            _free()
            cmp = compare_logits(base_logits, ref.logits, _DTYPE_TYPES.get(fused_dtype, "f32"))
            report.checks.append(
                Check(
                    f"fused ({fused_dtype}) vs base+adapter (MLX)",
                    "ok" if cmp.ok else "FAIL",
                    cmp.figures(),
                    cmp.values(),
                )
            )
    elif fused_dir is not None and lora_gguf is None:
        report.notes.append(
            "fused vs base+adapter not checked: pass the adapter (--adapter) to compare"
        )

    if not have_llama_cpp():
        for name in ("tokenization", "logits llama.cpp vs MLX"):
            report.checks.append(
                Check(name, "skipped", f"llama-cpp-python is not installed: {INSTALL_HINT}")
            )
        report.notes.append(f"llama.cpp checks skipped; get them with {INSTALL_HINT}")
        return report

    # (b) tokenization, (c) logits and greedy continuation
    report.checks.append(check_tokenization(gguf_path, tokenizer))
    n_ctx = max(len(p) for p in prompts) + greedy_tokens + 8
    llm = open_llama(gguf_path, n_ctx=n_ctx, lora_path=Path(lora_gguf) if lora_gguf else None)
    got = [llama_logits(llm, p) for p in prompts]
    cmp = compare_logits(ref.logits, got, kind)
    what = "llama.cpp base+LoRA vs MLX base+adapter" if lora_gguf else "logits llama.cpp vs MLX"
    report.checks.append(
        Check(
            f"{what} ({len(prompts)} prompts)",
            "ok" if cmp.ok else "FAIL",
            cmp.figures(),
            cmp.values(),
        )
    )
    if greedy_tokens:
        theirs = llama_greedy(llm, prompts[0], greedy_tokens)
        same = next(
            (i for i, (a, b) in enumerate(zip(ref.greedy, theirs, strict=True)) if a != b),
            len(theirs),
        )
        identical = theirs == ref.greedy
        # Only f32 must reproduce the continuation; rounded weights may flip a near-tie and diverge.
        status = "ok" if identical else ("FAIL" if kind == "f32" else "info")
        figures = (
            f"{greedy_tokens} tokens identical"
            if identical
            else f"first {same} of {greedy_tokens} tokens identical"
        )
        report.checks.append(
            Check(
                f"greedy {greedy_tokens} tokens",
                status,
                figures,
                {"mlx": ref.greedy, "llama_cpp": theirs, "identical_prefix": same},
            )
        )
    del llm
    return report


def verify_export(export: Any) -> Report:
    """Verify an export folder (or an :class:`mlx_lora.export.ExportResult`) from its manifest."""
    out = Path(getattr(export, "output_dir", export))
    manifest = out / EXPORT_MANIFEST
    if not manifest.is_file():
        raise MlxLoraError(
            f"{out} has no {EXPORT_MANIFEST}: pass a folder written by python -m mlx_lora.export"
        )
    m = json.loads(manifest.read_text(encoding="utf-8"))

    def path(key: str) -> Path | None:
        v = m.get(key)
        return None if v is None else (out / v if not Path(v).is_absolute() else Path(v))

    return verify_gguf(
        path("hf_dir"),
        path("gguf"),
        adapter_dir=path("adapter"),
        base_dir=path("base_dir"),
        gguf_type=m.get("gguf_type"),
        lora_gguf=path("lora_gguf"),
    )


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
        None, "threshold set to use (default: the GGUF's own file type)", choices=list(TOLERANCES)
    )


DESCRIPTION = """Check that a GGUF export is the model you trained: GGUF metadata vs the HF folder,
tokenization and next-token logits vs MLX in llama.cpp (needs llama-cpp-python), fused vs base+adapter.
Exits 1 when a check fails."""

EPILOG = f"""examples:
  python -m mlx_lora.verify --export-dir export/huanhuan
  python -m mlx_lora.verify --gguf m.gguf --hf-dir fused/ --adapter output/

llama.cpp checks need: {INSTALL_HINT}"""


def main(argv: list[str] | None = None) -> Report:
    c: VerifyConfig = parse_config(
        VerifyConfig, argv, "python -m mlx_lora.verify", DESCRIPTION, EPILOG
    )
    if c.export_dir:
        report = verify_export(Path(c.export_dir))
    elif c.gguf and c.hf_dir:
        report = verify_gguf(
            Path(c.hf_dir),
            Path(c.gguf),
            adapter_dir=Path(c.adapter) if c.adapter else None,
            base_dir=Path(c.base) if c.base else None,
            gguf_type=c.gguf_type,
            lora_gguf=Path(c.lora_gguf) if c.lora_gguf else None,
        )
    else:
        raise MlxLoraError("pass --export-dir OUT, or --gguf FILE with --hf-dir DIR")
    print(report.table())
    if not report.ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    from mlx_lora.cli import run

    sys.exit(run(main))
