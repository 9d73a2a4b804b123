"""Shared fixtures: tiny models built once per session, paths of the ../shared fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mlx_lora.blas import maybe_relaunch, relaunch_env


def pytest_configure(config):
    """Training tests are matmul-bound: on Linux, run the whole session with the system OpenBLAS."""
    if relaunch_env() is not None:
        capman = config.pluginmanager.getplugin("capturemanager")
        if (
            capman is not None
        ):  # give the new process the real stdout/stderr, not pytest's capture files
            capman.stop_global_capturing()
        maybe_relaunch()


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_TOKENIZER = SHARED / "fixtures" / "qwen15-tokenizer"
STORIES = SHARED / "fixtures" / "stories260K"
HUANHUAN = SHARED / "data" / "huanhuan.json"
SAMPLE_DATA = REPO / "dataset" / "huanhuan.json"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_tiny_model(out: Path, **kw) -> Path:
    return _load_script("make_tiny_model").make_tiny_model(out, **kw)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared fixtures)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Qwen2-architecture model with a small trained BPE and a Qwen1.5-like ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """Qwen2-architecture model with the real Qwen1.5 tokenizer (vocab 151,936)."""
    need(QWEN_TOKENIZER)
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen", tokenizer=QWEN_TOKENIZER
    )


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(QWEN_TOKENIZER)))
