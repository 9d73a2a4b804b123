"""Shared fixtures: tiny models built once per session, paths of the ../shared fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mlx_lora.core.blas import maybe_relaunch, relaunch_env
from mlx_lora.ollama.go_runner import GoRenderer, go_missing
from mlx_lora.testing import SAMPLE_DATA
from mlx_lora.testing.tiny_model import make_tiny_model

__all__ = ["SAMPLE_DATA", "make_tiny_model"]  # tests import them from here


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
# Chat requests the serve tests send: Chinese and English, a system turn, a multi-turn history.
CHAT_PROMPTS = [
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "user", "content": "Tell me about the palace garden."}],
    [{"role": "system", "content": "现在你要扮演甄嬛"}, {"role": "user", "content": "皇上呢？"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What now?"},
    ],
    [{"role": "user", "content": "1 + 1 = ?"}],
]


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


# ---------------------------------------------------------------- the Go harness (Ollama's engine)


class Harness(GoRenderer):
    """The package's Go renderer (tests call render/parse on it directly)."""


@pytest.fixture(scope="session")
def go() -> Harness:
    reason = go_missing()
    if reason:
        pytest.skip(reason)
    return Harness()


def _commands(parsed: dict) -> dict[str, list[str]]:
    assert not parsed.get("error"), parsed.get("error")
    out: dict[str, list[str]] = {}
    for c in parsed["commands"]:
        out.setdefault(c["name"], []).append(c["args"])
    return out


def load_script(name: str):
    """A script of ``scripts/`` as a module (scripts are not a package; tests drive some)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
