"""Hostile input: GGUF files whose header or numbers lie; config.json and flags the plan cannot use.

Every case must end in one line (an MlxLoraError naming the file and what is wrong; on the command
line ``error: …`` and exit 2), fast and in bounded memory:

- The GGUF cases (a valid tiny export, bytes patched or written again with ``gguf.GGUFWriter``)
  are imported in one subprocess under a 2 GB address-space limit, so a return to the reader's
  MemoryError, or an hour spent walking an array of 2^40 entries, fails here.
- The config.json and flag cases go through ``python -m mlx_lora.plan`` and through train, which
  must fail the same way before it reads a tokenizer or a weight. Numbers that are legal but huge
  get a plan that says the run does not fit, quickly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import REPO, SAMPLE_DATA, make_tiny_model

from mlx_lora.config import TrainConfig
from mlx_lora.core.cli import run
from mlx_lora.gguf.writer import write_gguf
from mlx_lora.model.gguf_check import MAX_ENTRIES
from mlx_lora.plan import footprint as fp
from mlx_lora.plan.__main__ import main as plan_main
from mlx_lora.plan.memory import worst_case_batch
from mlx_lora.train import loop
from mlx_lora.train.__main__ import main as train_main

V = gguf.GGUFValueType
LIMIT = 2 << 30  # address space of the subprocesses: a reader that allocates per claimed entry dies
ENV = {**os.environ, "MLX_LORA_NO_OPENBLAS": "1", "PYTHONPATH": str(REPO)}


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


# ------------------------------------------------------------------------------ building GGUFs


class Lab:
    """Valid tiny GGUFs (qwen2, llama) and ways to damage them."""

    def __init__(self, root: Path, qwen: Path, llama: Path) -> None:
        self.root, self.qwen, self.llama = root, qwen, llama
        self.good = qwen.read_bytes()
        r = gguf.GGUFReader(qwen)
        keys = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
        self.key_at = {k: int(f.offset) for k, f in keys.items()}
        self.value_at = {k: at + 8 + len(k.encode()) + 4 for k, at in self.key_at.items()}
        self.tensor_at = {t.name: int(t.field.offset) for t in r.tensors}

    def dims_at(self, name: str) -> int:
        return self.tensor_at[name] + 8 + len(name.encode())  # n_dims, then the dims

    def patched(self, name: str, *edits: tuple[int, str, object]) -> Path:
        """The qwen2 file with (offset, struct format, value) edits, or cut at (offset, 'cut')."""
        data = bytearray(self.good)
        for at, fmt, value in edits:
            if fmt == "cut":
                del data[at:]
            elif fmt == "raw":
                data[at : at + len(value)] = value
            else:
                data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        path = self.root / f"{name}.gguf"
        path.write_bytes(bytes(data))
        return path

    def rewritten(
        self,
        name: str,
        meta: dict | None = None,
        tensors: dict | None = None,
        src: Path | None = None,
    ) -> Path:
        """``src`` (qwen2) written again: ``meta`` key → (value, type[, sub type]) or None (drop);
        ``tensors`` name → array, (new name, array) or None (drop)."""
        r = gguf.GGUFReader(src or self.qwen)
        path = self.root / f"{name}.gguf"
        w = gguf.GGUFWriter(path, "unused")
        kv = w.kv_data[0]
        kv.clear()
        for key, f in r.fields.items():
            if not key.startswith("GGUF."):
                sub = f.types[-1] if f.types[0] == V.ARRAY else None
                kv[key] = gguf.GGUFValue(f.contents(), f.types[0], sub)
        for key, v in (meta or {}).items():
            kv.pop(key, None)
            if v is not None:
                kv[key] = gguf.GGUFValue(v[0], v[1], v[2] if len(v) > 2 else None)
        tensors = tensors or {}
        for t in r.tensors:
            new = tensors.get(t.name, t.data)
            if new is None:
                continue
            tname, data = new if isinstance(new, tuple) else (t.name, new)
            w.add_tensor(tname, np.ascontiguousarray(data))
        for tname, data in tensors.items():
            if tname not in {t.name for t in r.tensors} and data is not None:
                w.add_tensor(tname, np.ascontiguousarray(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    def handmade(self, name: str, kv_bytes: bytes, n_keys: int = 1) -> Path:
        """A GGUF of metadata only, its key/value bytes as given."""
        path = self.root / f"{name}.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_keys) + kv_bytes)
        return path


def _key(name: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


def _tokens(lab: Lab, n: int) -> list[str]:
    return gguf.GGUFReader(lab.qwen).fields["tokenizer.ggml.tokens"].contents()[:n]


def _types(lab: Lab, n: int) -> list[int]:
    return gguf.GGUFReader(lab.qwen).fields["tokenizer.ggml.token_type"].contents()[:n]


def _tensor(lab: Lab, name: str, src: Path | None = None) -> np.ndarray:
    return next(t.data for t in gguf.GGUFReader(src or lab.qwen).tensors if t.name == name)


Q, L = "qwen2.", "llama."
U32, I32, U64 = V.UINT32, V.INT32, V.UINT64
TOKENS, TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"


def _header_cases() -> dict[str, tuple[Callable[[Lab], Path], str]]:
    """Damaged counts and lengths in the header: refused before the reader allocates for them."""
    va = lambda lab, k: lab.value_at[k]  # noqa: E731
    return {
        "tensor count 2^63": (lambda lab: lab.patched("tc", (8, "<Q", 2**63)), "tensors, more"),
        "key count 2^40": (lambda lab: lab.patched("kc", (16, "<Q", 2**40)), "keys, more than"),
        "key count too small": (lambda lab: lab.patched("ks", (16, "<Q", 5)), "claims 1,726 dim"),
        "tokens claim 2^40": (
            lambda lab: lab.patched("tok", (va(lab, TOKENS) + 4, "<Q", 2**40)),
            "tokenizer.ggml.tokens claims 1,099,511,627,776 entries",
        ),
        "token types claim 2^33": (
            lambda lab: lab.patched("tt", (va(lab, TYPES) + 4, "<Q", 2**33)),
            "tokenizer.ggml.token_type claims 8,589,934,592 entries",
        ),
        "merges claim a few more": (
            lambda lab: lab.patched("mg", (va(lab, "tokenizer.ggml.merges") + 4, "<Q", 10**6)),
            "tokenizer.ggml.merges claims 1,000,000 entries",
        ),
        "key length 2^62": (
            lambda lab: lab.patched("kl", (lab.key_at["general.architecture"], "<Q", 2**62)),
            "runs past the end of the file",
        ),
        "string length 2^50": (
            lambda lab: lab.patched("sl", (va(lab, "general.name"), "<Q", 2**50)),
            "runs past the end of the file",
        ),
        "unknown value type": (
            lambda lab: lab.patched("vt", (va(lab, "general.name") - 4, "<I", 99)),
            "general.name has unknown value type 99",
        ),
        "unknown array entry type": (
            lambda lab: lab.patched("at", (va(lab, TYPES), "<I", 99)),
            "token_type has entries of type 99",
        ),
        "tensor with 2^31 dimensions": (
            lambda lab: lab.patched("nd", (lab.dims_at("token_embd.weight"), "<I", 2**31)),
            "claims 2,147,483,648 dimensions",
        ),
        "tensor of 2^40 rows": (
            lambda lab: lab.patched("rows", (lab.dims_at("token_embd.weight") + 12, "<Q", 2**40)),
            "token_embd.weight lies past the end of the file",
        ),
        "tensor dims whose product wraps to 0": (
            lambda lab: lab.patched(
                "wrap",
                (lab.dims_at("token_embd.weight") + 4, "<Q", 2**32),
                (lab.dims_at("token_embd.weight") + 12, "<Q", 2**32),
            ),
            "token_embd.weight lies past the end of the file",
        ),
        "tensor data offset 2^60": (
            lambda lab: lab.patched("off", (lab.dims_at("token_embd.weight") + 24, "<Q", 2**60)),
            "token_embd.weight lies past the end of the file",
        ),
        "version 7": (lambda lab: lab.patched("ver", (4, "<I", 7)), "version 7"),
        "no magic": (lambda lab: lab.patched("magic", (0, "raw", b"GGUX")), "no GGUF magic"),
        "cut inside the tokens": (
            lambda lab: lab.patched("cut", (va(lab, TOKENS) + 5000, "cut", None)),
            "tokenizer.ggml.tokens claims 1,536 entries, more than the 4,988 bytes left",
        ),
        "key not UTF-8": (
            lambda lab: lab.patched("utf", (lab.key_at["general.name"] + 8, "raw", b"\xff\xfe")),
            "not a readable GGUF file",
        ),
        "alignment 0": (
            lambda lab: lab.rewritten("al", {"general.alignment": (0, U32)}),
            "general.alignment must be a uint32 power of two",
        ),
        "more array entries than any vocabulary": (
            lambda lab: lab.handmade(
                "cap",
                _key("x.bytes", V.ARRAY)
                + struct.pack("<IQ", V.UINT8, MAX_ENTRIES + 1)
                + bytes(MAX_ENTRIES + 1),
            ),
            "more than any model's vocabulary needs",
        ),
        "nested array claims 2^40": (
            lambda lab: lab.handmade(
                "nest",
                _key("x.nested", V.ARRAY) + struct.pack("<IQIQ", V.ARRAY, 1, V.UINT8, 2**40),
            ),
            "x.nested claims 1,099,511,627,776 entries",
        ),
        "arrays nested 5 deep": (
            lambda lab: lab.handmade(
                "deep", _key("x.deep", V.ARRAY) + struct.pack("<IQ", V.ARRAY, 1) * 5 + bytes(64)
            ),
            "x.deep has entries of type 9",
        ),
    }


def _meta(name: str, meta: dict) -> Callable[[Lab], Path]:
    """A rewrite of the qwen2 file (with ``llama.`` keys: the llama file), metadata changed."""

    def build(lab: Lab) -> Path:
        src = lab.llama if any(k.startswith("llama.") for k in meta) else lab.qwen
        return lab.rewritten(name, meta, src=src)

    return build


def _hparam_cases() -> dict[str, tuple[Callable[[Lab], Path], str]]:
    """Numbers that contradict each other or the tensors: refused before anything is built."""
    bc, hc, kv = Q + "block_count", Q + "attention.head_count", Q + "attention.head_count_kv"
    m = {
        "block_count 0": ({bc: (0, U32)}, "block_count is 0, outside 1 to"),
        "block_count 10^7": ({bc: (10**7, U32)}, "block_count is 10,000,000 but the file has"),
        "block_count 2^63": (
            {bc: (2**63, U64)},
            "block_count is 9,223,372,036,854,775,808, outside 1 to",
        ),
        "block_count 1 (2 blocks of tensors)": ({bc: (1, U32)}, "block_count is 1 but"),
        "block_count 3 (2 blocks of tensors)": ({bc: (3, U32)}, "block_count is 3 but"),
        "block_count a string": ({bc: ("2", V.STRING)}, "block_count is '2', not a whole"),
        "head_count 0": ({hc: (0, U32)}, "head_count is 0, outside 1 to"),
        "head_count -4": ({hc: (-4, I32)}, "head_count is -4, outside 1 to"),
        "head_count_kv 0": ({kv: (0, U32)}, "head_count_kv is 0, outside 1 to"),
        "head_count_kv 3 of 4": ({kv: (3, U32)}, "head_count_kv (3) does not divide"),
        "head_count_kv 8 > 4 heads": ({kv: (8, U32)}, "head_count_kv (8) does not divide"),
        "head_count 3 does not divide 64": (
            {hc: (3, U32), kv: (1, U32)},
            "embedding_length (64) is not a multiple of qwen2.attention.head_count (3)",
        ),
        "head_count a string": ({hc: ("four", V.STRING)}, "head_count is 'four', not a whole"),
        "head_count 4.5": ({hc: (4.5, V.FLOAT32)}, "head_count is 4.5, not a whole"),
        "head_count_kv per layer": ({kv: ([2, 2], V.ARRAY, I32)}, "holds 2 values (one per"),
        "embedding_length 0": (
            {Q + "embedding_length": (0, U32)},
            "embedding_length is 0, outside 1 to",
        ),
        "embedding_length 128 (tensors: 64)": (
            {Q + "embedding_length": (128, U32), hc: (8, U32), kv: (4, U32)},
            "token_embd.weight has shape [1536, 64] but the metadata",
        ),
        "context_length 0": ({Q + "context_length": (0, U32)}, "context_length is 0, outside 1 to"),
        "context_length -1": (
            {Q + "context_length": (-1, I32)},
            "context_length is -1, outside 1 to",
        ),
        "feed_forward_length 0": (
            {Q + "feed_forward_length": (0, U32)},
            "feed_forward_length is 0",
        ),
        "feed_forward_length 256 (tensors: 128)": (
            {Q + "feed_forward_length": (256, U32)},
            "blk.0.ffn_down.weight has shape [64, 128] but the metadata",
        ),
        "key_length 0": ({Q + "attention.key_length": (0, U32)}, "key_length is 0, outside 1 to"),
        "qwen2 key_length 24": (
            {Q + "attention.key_length": (24, U32)},
            "key_length (24) is not qwen2.embedding_length / head_count (16)",
        ),
        "value_length 8": ({Q + "attention.value_length": (8, U32)}, "value_length differs"),
        "rope.freq_base 0": ({Q + "rope.freq_base": (0.0, V.FLOAT32)}, "not a positive number"),
        "rope.freq_base NaN": (
            {Q + "rope.freq_base": (float("nan"), V.FLOAT32)},
            "not a positive number",
        ),
        "rms epsilon negative": (
            {Q + "attention.layer_norm_rms_epsilon": (-1e-6, V.FLOAT32)},
            "not a positive number",
        ),
        "rope scaling factor a string": (
            {
                Q + "rope.scaling.type": ("linear", V.STRING),
                Q + "rope.scaling.factor": ("x", V.STRING),
            },
            "rope.scaling.factor is 'x', not a positive number",
        ),
        "yarn original context -5": (
            {
                Q + "rope.scaling.type": ("yarn", V.STRING),
                Q + "rope.scaling.factor": (4.0, V.FLOAT32),
                Q + "rope.scaling.original_context_length": (-5, I32),
            },
            "original_context_length is -5, outside 1 to",
        ),
        "rope scaling type unknown": (
            {Q + "rope.scaling.type": ("weird", V.STRING)},
            "rope scaling type 'weird' is not supported",
        ),
        "architecture an array": (
            {"general.architecture": (["qwen2"], V.ARRAY, V.STRING)},
            "architecture ['qwen2'] is not supported",
        ),
        "architecture a number": ({"general.architecture": (7, U32)}, "architecture 7 is not"),
        "tokens not strings": ({TOKENS: (list(range(1536)), V.ARRAY, I32)}, "not an array of str"),
        "token types strings": ({TYPES: (["1"] * 1536, V.ARRAY, V.STRING)}, "not an array of int"),
        "merges numbers": (
            {"tokenizer.ggml.merges": ([1, 2], V.ARRAY, I32)},
            "merges is not an array of strings",
        ),
        "llama head_count 0": (
            {L + "attention.head_count": (0, U32)},
            "head_count is 0, outside 1 to",
        ),
        "llama head_count_kv 3 of 4": (
            {L + "attention.head_count_kv": (3, U32)},
            "head_count_kv (3) does not divide",
        ),
        "llama key_length 24 (tensors: 16)": (
            {L + "attention.key_length": (24, U32), L + "attention.value_length": (24, U32)}
            | {L + "rope.dimension_count": (24, U32)},
            "blk.0.attn_k.weight has shape [32, 64] but the metadata",
        ),
        "llama key_length 15 (odd)": (
            {L + "attention.key_length": (15, U32), L + "attention.value_length": (15, U32)}
            | {L + "rope.dimension_count": (15, U32)},
            "odd: RoPE rotates pairs",
        ),
        "llama vocab_size 999": ({L + "vocab_size": (999, U32)}, "vocab_size is 999 but"),
    }
    return {
        name: (_meta(f"m{i}", meta), needle) for i, (name, (meta, needle)) in enumerate(m.items())
    }


def _vocab_and_tensor_cases() -> dict[str, tuple[Callable[[Lab], Path], str]]:
    """The vocabulary against the embedding; tensors against the metadata."""
    embd = "token_embd.weight"

    def tokens(lab: Lab, name: str, n: int) -> Path:
        toks, types = _tokens(lab, 1536), _types(lab, 1536)
        toks, types = (toks + [f"extra{i}" for i in range(n - 1536)])[:n], (types + [1] * n)[:n]
        return lab.rewritten(
            name, {TOKENS: (toks, V.ARRAY, V.STRING), TYPES: (types, V.ARRAY, I32)}
        )

    return {
        "fewer tokens than embedding rows": (
            lambda lab: tokens(lab, "few", 1500),
            "tokenizer.ggml.tokens has 1,500 tokens but token_embd.weight has 1,536 rows",
        ),
        "more tokens than embedding rows": (
            lambda lab: tokens(lab, "many", 1600),
            "has 1,600 tokens but token_embd.weight has 1,536 rows",
        ),
        "attn_q of 48 rows": (
            lambda lab: lab.rewritten(
                "q48", tensors={"blk.0.attn_q.weight": np.zeros((48, 64), np.float32)}
            ),
            "blk.0.attn_q.weight has shape [48, 64] but the metadata",
        ),
        "embedding 32 wide": (
            lambda lab: lab.rewritten("e32", tensors={embd: np.zeros((1536, 32), np.float32)}),
            "token_embd.weight has shape [1536, 32]",
        ),
        "a norm with 3 dimensions": (
            lambda lab: lab.rewritten(
                "n3", tensors={"blk.0.ffn_norm.weight": np.zeros((1, 1, 64), np.float32)}
            ),
            "blk.0.ffn_norm.weight has shape [1, 1, 64]",
        ),
        "block number 01": (
            lambda lab: lab.rewritten(
                "b01",
                tensors={
                    "blk.1.attn_q.weight": (
                        "blk.01.attn_q.weight",
                        _tensor(lab, "blk.1.attn_q.weight"),
                    )
                },
            ),
            "tensor 'blk.01.attn_q.weight' has no Hugging Face counterpart",
        ),
        "block number x": (
            lambda lab: lab.rewritten("bx", tensors={"blk.x.attn_q.weight": np.zeros(4, "f4")}),
            "tensor 'blk.x.attn_q.weight' has no block number",
        ),
        "rope_freqs of 5": (
            lambda lab: lab.rewritten(
                "rf", tensors={"rope_freqs.weight": np.ones(5, np.float32)}, src=lab.llama
            ),
            "rope_freqs.weight has shape [5]",
        ),
        "no embedding": (
            lambda lab: lab.rewritten("noemb", tensors={embd: None}),
            "token_embd.weight is missing",
        ),
    }


GGUF_CASES = {**_header_cases(), **_hparam_cases(), **_vocab_and_tensor_cases()}
# harmless oddities: the import goes through
ACCEPTED = {
    "a clean rewrite (the builder itself damages nothing)": lambda lab: lab.rewritten("clean"),
    "chat_templates a number": _meta("ct", {"tokenizer.chat_templates": (5, U32)}),
}

SWEEP = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.hub import resolve_model
from mlx_lora.train.report import peak_rss_bytes
out = {{}}
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    try:
        resolve_model(path)
        kind, msg = "ok", ""
    except MlxLoraError as e:
        kind, msg = "refused", str(e)
    except BaseException as e:  # MemoryError, or the traceback of a bug
        kind, msg = type(e).__name__, str(e)[:300]
    out[path] = [kind, msg, time.perf_counter() - t0]
# VmHWM, not ru_maxrss: that keeps the parent's size at fork time across exec (a big pytest)
out["peak_rss_kb"] = peak_rss_bytes() // 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(tiny_model: Path, tmp_path_factory) -> Lab:
    root = tmp_path_factory.mktemp("hostile")
    llama = make_tiny_model(root / "tiny-llama", arch="llama")
    qwen = write_gguf(tiny_model, root / "good-qwen2.gguf", "f32", progress=False)
    return Lab(root, qwen, write_gguf(llama, root / "good-llama.gguf", "f32", progress=False))


def test_hostile_ggufs_are_one_line_refusals_in_bounded_memory(lab: Lab, tmp_path: Path) -> None:
    files = {name: build(lab) for name, (build, _) in GGUF_CASES.items()}
    fine = {name: build(lab) for name, build in ACCEPTED.items()}
    env = {**ENV, "MLX_LORA_CACHE": str(tmp_path / "cache"), "OLLAMA_MODELS": str(tmp_path)}
    paths = [str(p) for p in [*files.values(), *fine.values()]]
    r = subprocess.run(
        [sys.executable, "-c", SWEEP.format(limit=LIMIT), *paths],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    bad = {}
    for name, path in files.items():
        kind, msg, seconds = out[str(path)]
        needle = GGUF_CASES[name][1]
        one_line = "\n" not in msg and str(path) in msg
        if kind != "refused" or needle not in msg or not one_line or seconds > 5:
            bad[name] = (kind, msg, round(seconds, 2))
    for name, path in fine.items():
        if out[str(path)][0] != "ok":
            bad[name] = out[str(path)]
    assert not bad, json.dumps(bad, indent=1, ensure_ascii=False)
    assert out["peak_rss_kb"] < LIMIT // 1024
    folders = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert len(folders) == len(fine)  # nothing of a refused file is left in the cache


@pytest.mark.parametrize("case", ["tokens claim 2^40", "block_count 10^7", "head_count 0"])
def test_cli_refuses_a_hostile_gguf_with_one_line(lab: Lab, tmp_path: Path, case: str) -> None:
    path = GGUF_CASES[case][0](lab)
    env = {**ENV, "MLX_LORA_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lora.plan", "--model", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        preexec_fn=_limited,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert GGUF_CASES[case][1] in r.stderr and str(path) in r.stderr


# ------------------------------------------------------------------------------ the plan


def _config_cases() -> dict[str, tuple[object, str]]:
    """config.json content (text, or a change to the tiny model's dict) → what the error says."""
    return {
        "not JSON": ('{"hidden_size": ', "not valid JSON"),
        "empty file": ("", "not valid JSON"),
        "a list": ([1, 2], "expected a JSON object, got list"),
        "a string": ('"qwen2"', "expected a JSON object, got str"),
        "no hidden_size": ({"hidden_size": None}, "missing or bad 'hidden_size'"),
        "hidden_size a word": ({"hidden_size": "abc"}, "hidden_size is 'abc', not a whole"),
        "hidden_size a numeric string": ({"hidden_size": "64"}, "hidden_size is '64', not a"),
        "hidden_size 64.5": ({"hidden_size": 64.5}, "hidden_size is 64.5, not a whole"),
        "hidden_size true": ({"hidden_size": True}, "hidden_size is True, not a whole"),
        "hidden_size 0": ({"hidden_size": 0}, "hidden_size is 0, outside 1 to"),
        "hidden_size -64": ({"hidden_size": -64}, "hidden_size is -64, outside 1 to"),
        "hidden_size 10^12": (
            {"hidden_size": 10**12},
            "hidden_size is 1,000,000,000,000, outside 1 to",
        ),
        "layers 0": ({"num_hidden_layers": 0}, "num_hidden_layers is 0, outside 1 to"),
        "layers -2": ({"num_hidden_layers": -2}, "num_hidden_layers is -2, outside 1 to"),
        "layers 10^7": (
            {"num_hidden_layers": 10**7},
            "num_hidden_layers is 10,000,000, outside 1 to",
        ),
        "layers 10^18": ({"num_hidden_layers": 10**18}, "outside 1 to 1,024 (the largest released"),
        "heads 0": ({"num_attention_heads": 0}, "num_attention_heads is 0, outside 1 to"),
        "heads -4": ({"num_attention_heads": -4}, "num_attention_heads is -4, outside 1 to"),
        "kv heads 0": ({"num_key_value_heads": 0}, "num_key_value_heads is 0, outside 1 to"),
        "kv heads 3 of 4": ({"num_key_value_heads": 3}, "num_key_value_heads (3) does not"),
        "kv heads 8 > 4": ({"num_key_value_heads": 8}, "num_key_value_heads (8) does not"),
        "heads 3 do not divide 64": (
            {"num_attention_heads": 3, "num_key_value_heads": 1},
            "hidden_size (64) is not a multiple of num_attention_heads (3)",
        ),
        "vocab 0": ({"vocab_size": 0}, "vocab_size is 0, outside 1 to"),
        "vocab -5": ({"vocab_size": -5}, "vocab_size is -5, outside 1 to"),
        "intermediate 0": ({"intermediate_size": 0}, "intermediate_size is 0, outside 1 to"),
        "intermediate -1": ({"intermediate_size": -1}, "intermediate_size is -1, outside 1 to"),
        "head_dim 0": ({"head_dim": 0}, "head_dim is 0, outside 1 to"),
        "quantization a string": ({"quantization": "4bit"}, "quantization is '4bit', not"),
        "quantization 0 bits": ({"quantization": {"bits": 0}}, "quantization is {'bits': 0}"),
        "gemma2 heads 0": (
            {"num_attention_heads": 0, "model_type": "gemma2"},
            "heads is 0, outside 1 to",
        ),
        "gemma2 layers 10^7": (
            {"num_hidden_layers": 10**7, "model_type": "gemma2"},
            "num_hidden_layers is 10,000,000, outside 1 to",
        ),
    }


CONFIG_CASES = _config_cases()


def _folder(tiny_model: Path, root: Path, name: str, content: object) -> Path:
    """A copy of the tiny model whose config.json is ``content`` (text, or changes to apply)."""
    folder = root / name.replace(" ", "_").replace("^", "")
    if not folder.exists():
        shutil.copytree(tiny_model, folder)
    path = folder / "config.json"
    if isinstance(content, dict):
        config = json.loads((tiny_model / "config.json").read_text())
        config.update(content)
        content = json.dumps({k: v for k, v in config.items() if v is not None})
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def _one_line(main: Callable, argv: list[str], capsys) -> str:
    capsys.readouterr()
    t0 = time.perf_counter()
    code = run(main, argv)
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 10, argv
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture
def nothing_loaded(monkeypatch) -> None:
    """train may not read a tokenizer or weights before it refuses."""

    def loaded(*a, **k):
        raise AssertionError("train loaded the model before refusing")

    monkeypatch.setattr(loop, "load_base_tokenizer", loaded)
    monkeypatch.setattr(loop, "_load", loaded)


def test_broken_configs_are_one_line_in_plan_and_train(
    tiny_model: Path, tmp_path: Path, capsys, nothing_loaded
) -> None:
    data = ["--data", str(SAMPLE_DATA)]
    for name, (content, needle) in CONFIG_CASES.items():
        folder = _folder(tiny_model, tmp_path, name, content)
        config = str(folder / "config.json")
        plain = _one_line(plan_main, ["--model", str(folder)], capsys)
        with_data = _one_line(plan_main, ["--model", str(folder), *data], capsys)
        trained = _one_line(
            train_main,
            ["--model", str(folder), *data, "--output-dir", str(tmp_path / "out")],
            capsys,
        )
        assert needle in plain and config in plain, (name, plain)
        assert plain == with_data == trained, (name, plain, with_data, trained)


FLAG_CASES = {
    "batch 0": (["--per-device-train-batch-size", "0"], "must be > 0, got 0"),
    "batch -1": (["--per-device-train-batch-size", "-1"], "must be > 0, got -1"),
    "batch x": (["--per-device-train-batch-size", "x"], "invalid int value: 'x'"),
    "max-seq -1": (["--max-seq-length", "-1"], "--max-seq-length must be at least 2, got -1"),
    "max-seq 0": (["--max-seq-length", "0"], "--max-seq-length must be at least 2, got 0"),
    "max-seq 1": (["--max-seq-length", "1"], "--max-seq-length must be at least 2, got 1"),
    "accumulation 0": (["--gradient-accumulation-steps", "0"], "steps must be > 0, got 0"),
    "accumulation -3": (["--gradient-accumulation-steps", "-3"], "steps must be > 0, got -3"),
    "lora-r 0": (["--lora-r", "0"], "--lora-r must be > 0, got 0"),
    "lora-r -1": (["--lora-r", "-1"], "--lora-r must be > 0, got -1"),
    "lora-layers 0": (["--lora-layers", "0"], "--lora-layers must be > 0, got 0"),
    "lora-layers 100 of 2": (["--lora-layers", "100"], "between 1 and the model's 2 blocks"),
    "epochs 0": (["--num-train-epochs", "0"], "--num-train-epochs must be > 0"),
    "epochs nan": (["--num-train-epochs", "nan"], "--num-train-epochs must be > 0"),
    "epochs inf": (["--num-train-epochs", "inf"], "--num-train-epochs must be > 0"),
    "learning rate 0": (["--learning-rate", "0"], "--learning-rate must be > 0"),
    "learning rate inf": (["--learning-rate", "inf"], "--learning-rate must be > 0"),
    "lora-alpha 0": (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    "dropout 1": (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    "no target modules": (["--target-modules", ","], "--target-modules names no module"),
    "val-split 1.5": (["--val-split", "1.5"], "--val-split must be in [0, 1), got 1.5"),
    "weight decay -1": (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
}


def test_bad_flags_are_one_line_in_plan_and_train(
    tiny_model: Path, tmp_path: Path, capsys, nothing_loaded
) -> None:
    base = ["--model", str(tiny_model), "--data", str(SAMPLE_DATA)]
    for name, (flags, needle) in FLAG_CASES.items():
        plain = _one_line(plan_main, ["--model", str(tiny_model), *flags], capsys)
        with_data = _one_line(plan_main, [*base, *flags], capsys)
        out = ["--output-dir", str(tmp_path / "out")]
        trained = _one_line(train_main, [*base, *flags, *out], capsys)
        trained = trained.replace("mlx_lora.train --help", "mlx_lora.plan --help")
        assert needle in plain, (name, plain)
        assert plain == with_data == trained, (name, plain, with_data, trained)


BIG_MODEL = {"hidden_size": 65536, "num_attention_heads": 512, "num_key_value_heads": 512}
BIG_MODEL |= {"intermediate_size": 262144, "num_hidden_layers": 512, "vocab_size": 10**6}
HUGE = {  # legal numbers: a correct plan, quickly (config changes, flags, verdict)
    "batch 10^9, --suggest": (
        {},
        ["--per-device-train-batch-size", str(10**9), "--suggest"],
        "NOT",
    ),
    "max-seq 10^9": ({}, ["--max-seq-length", str(10**9)], "does NOT fit"),
    "lora-r 10^9": ({}, ["--lora-r", str(10**9)], "does NOT fit"),
    "accumulation 10^9, --data": (
        {},
        ["--gradient-accumulation-steps", str(10**9), "--data", str(SAMPLE_DATA)],
        "→ fits",
    ),
    "hidden 65536, 512 layers, vocab 10^6, --suggest": (BIG_MODEL, ["--suggest"], "NOT fit"),
}


def test_huge_legal_numbers_get_a_quick_plan(tiny_model: Path, tmp_path: Path, capsys) -> None:
    for i, (name, (changes, flags, verdict)) in enumerate(HUGE.items()):
        model = _folder(tiny_model, tmp_path, f"huge{i}", changes) if changes else tiny_model
        t0 = time.perf_counter()
        assert run(plan_main, ["--model", str(model), *flags]) == 0, name
        out = capsys.readouterr().out
        assert time.perf_counter() - t0 < 10, name
        assert verdict in out, (name, out)


def test_a_run_too_long_to_lay_out_is_planned_for_its_heaviest_batch(
    tiny_model: Path, capsys
) -> None:
    argv = ["--model", str(tiny_model), "--data", str(SAMPLE_DATA), "--max-steps", str(10**12)]
    t0 = time.perf_counter()
    assert run(plan_main, argv) == 0
    assert time.perf_counter() - t0 < 20
    assert "the heaviest batch any step could draw" in capsys.readouterr().out


def test_train_refuses_a_huge_config_before_loading_weights(
    tiny_model: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(loop, "_load", lambda *a, **k: pytest.fail("loaded the weights"))
    big = _folder(tiny_model, tmp_path, "huge", BIG_MODEL)
    argv = ["--model", str(big), "--data", str(SAMPLE_DATA), "--output-dir", str(tmp_path / "o")]
    assert "this run needs about" in _one_line(train_main, argv, capsys)


def test_cli_refuses_ten_million_layers_in_bounded_memory(tiny_model: Path, tmp_path: Path):
    folder = _folder(tiny_model, tmp_path, "layers", {"num_hidden_layers": 10**7})
    for command in ("mlx_lora.plan", "mlx_lora.train"):
        r = subprocess.run(
            [sys.executable, "-m", command, "--model", str(folder), "--data", str(SAMPLE_DATA)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=ENV,
            timeout=60,
            preexec_fn=_limited,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.count("\n") == 1 and "num_hidden_layers is 10,000,000" in r.stderr


@pytest.mark.parametrize("path", ["fast", "packed", "general"])
@pytest.mark.parametrize(("bs", "n", "packing", "lanes"), [(1, 2, True, 1), (5, 37, True, 3)])
def test_worst_case_in_closed_form_is_the_layout(tiny_model, path, bs, n, packing, lanes) -> None:
    """The worst-case micro-batch, now computed without laying out ``batch`` rows, is still what
    the layout of ``batch`` full-length examples gives."""
    cfg = TrainConfig(per_device_train_batch_size=bs, max_seq_length=n, packing=packing)
    shape = dataclasses.replace(fp.read_shape(tiny_model), path=path)
    want = fp.layout([n] * bs, [n - 1] * bs, n, path, packing, lanes)
    assert worst_case_batch(cfg, shape, lanes) == want


def test_case_count() -> None:
    """How many distinct hostile inputs this file tries: the run of 10^12 steps is the +1, the
    clean rewrite (a control of the GGUF builder) the -1."""
    n = len(GGUF_CASES) + len(ACCEPTED) + len(CONFIG_CASES) + len(FLAG_CASES) + len(HUGE) + 1 - 1
    assert n == 131, n
