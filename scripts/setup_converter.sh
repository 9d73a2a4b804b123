#!/usr/bin/env bash
# Set up llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) in DIR
# (default: <repo>/.converter), so tests/test_llama_cpp_converter.py can check that a fused folder
# converts with them unmodified and that mlx_lora's GGUF writer produces the same GGUF.
#
# The converters need torch. It goes into a venv of its own (DIR/venv), never into the project
# venv: mlx_lora must not depend on torch, and transformers takes other code paths when torch is
# importable, so the test venv has to stay torch-free. The converter sources come from the
# llama-cpp-python sdist on PyPI (vendor/llama.cpp/), the same version as the llama-cpp-python
# installed next to mlx_lora when there is one, so the converter matches the llama.cpp that
# verify.py runs. Idempotent: whatever is already in place is kept.
#
# usage: bash scripts/setup_converter.sh [DIR]
#   PYTHON=...             interpreter that creates DIR/venv (default: python3)
#   LLAMA_CPP_PYTHON_VERSION=x.y.z   sdist version to fetch (default: the installed one, else latest)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$REPO/.converter}"
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
# What the converters and their gguf-py import at top level (mistral_common is optional there:
# it is only needed for Mistral-format checkpoints, which mlx_lora does not write).
DEPS=(numpy sentencepiece safetensors transformers protobuf pyyaml tqdm requests peft)

fail() { echo "setup_converter: $*" >&2; exit 1; }

mkdir -p "$DIR" || fail "cannot create $DIR"
DIR="$(cd "$DIR" && pwd)"
VENV="$DIR/venv"
SRC="$DIR/llama.cpp"

# ---- 1. converter venv with CPU torch -------------------------------------------------------
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, numpy, sentencepiece, safetensors, transformers, google.protobuf, yaml, tqdm, requests, peft" 2>/dev/null; then
  echo "setup_converter: $VENV already has torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  command -v "$PY" >/dev/null 2>&1 || fail "$PY not found; set PYTHON=/path/to/python3"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || fail "cannot create the venv $VENV (is python3-venv installed?)"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip || echo "setup_converter: pip upgrade failed (continuing)" >&2
  # Never a bare `torch`: that resolves to the multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" \
    || fail "cannot install $TORCH_SPEC (CPU) into $VENV; the converters need it"
  "$VENV/bin/python" -m pip install -q "${DEPS[@]}" \
    || fail "cannot install ${DEPS[*]} into $VENV"
  "$VENV/bin/python" -c "import torch; print('setup_converter: torch', torch.__version__)" \
    || fail "torch does not import in $VENV"
fi

# ---- 2. converter sources from the llama-cpp-python sdist ------------------------------------
if [ -f "$SRC/convert_hf_to_gguf.py" ] && [ -f "$SRC/convert_lora_to_gguf.py" ] && [ -d "$SRC/gguf-py/gguf" ]; then
  echo "setup_converter: converter sources already in $SRC ($(cat "$SRC/VERSION" 2>/dev/null || echo 'version unknown'))"
else
  VER="${LLAMA_CPP_PYTHON_VERSION:-}"
  if [ -z "$VER" ]; then
    VER="$("$PY" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)"
  fi
  DL="$DIR/sdist"
  rm -rf "$DL" && mkdir -p "$DL"
  got=""
  if [ -n "$VER" ]; then
    echo "setup_converter: fetching the llama-cpp-python $VER sdist"
    if "$VENV/bin/python" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$DL"; then
      got=1
    else
      echo "setup_converter: llama-cpp-python==$VER sdist unavailable; trying the latest" >&2
    fi
  fi
  if [ -z "$got" ]; then
    "$VENV/bin/python" -m pip download -q --no-binary :all: --no-deps llama-cpp-python -d "$DL" \
      || fail "cannot download the llama-cpp-python sdist from PyPI"
  fi
  SDIST="$(ls "$DL"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1)"
  [ -n "$SDIST" ] || fail "no llama_cpp_python-*.tar.gz in $DL after pip download"
  # Unpack only the converter files into a temp dir, then rename: no half-unpacked tree survives.
  "$VENV/bin/python" - "$SDIST" "$SRC" <<'EOF' || fail "cannot unpack the converter from $SDIST"
import os, shutil, sys, tarfile, tempfile
sdist, dest = sys.argv[1], sys.argv[2]
wanted_files = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
wanted_dirs = ("gguf-py/", "conversion/")  # conversion/: the model classes of newer converters
tmp = tempfile.mkdtemp(prefix=".llama.cpp.tmp-", dir=os.path.dirname(dest))
try:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1][len("vendor/llama.cpp/"):]
            if rel in wanted_files or rel.startswith(wanted_dirs):
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = rel
                members.append(m)
        found = {m.name for m in members}
        missing = [f for f in wanted_files if f not in found] + (
            [] if any(n.startswith("gguf-py/gguf/") for n in found) else ["gguf-py/gguf/"])
        if missing:
            sys.exit(f"{sdist} lacks vendor/llama.cpp/{', '.join(missing)}")
        tar.extractall(tmp, members=members, filter="data")
    with open(os.path.join(tmp, "VERSION"), "w") as f:
        f.write(os.path.basename(sdist).removesuffix(".tar.gz") + "\n")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.replace(tmp, dest)
except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
EOF
  rm -rf "$DL"
  echo "setup_converter: unpacked $(cat "$SRC/VERSION") converter into $SRC"
fi

# ---- 3. smoke check: the converter starts with its own gguf-py ----------------------------------
PYTHONPATH="$SRC/gguf-py" "$VENV/bin/python" "$SRC/convert_hf_to_gguf.py" --help >/dev/null \
  || fail "convert_hf_to_gguf.py --help failed in $VENV (a missing import?)"
PYTHONPATH="$SRC/gguf-py" "$VENV/bin/python" "$SRC/convert_lora_to_gguf.py" --help >/dev/null \
  || fail "convert_lora_to_gguf.py --help failed in $VENV (a missing import?)"
echo "setup_converter: ready: $VENV/bin/python $SRC/convert_hf_to_gguf.py"
