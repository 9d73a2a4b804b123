"""Resolving --model: local folders, hub ids, and the one-line errors when neither works."""

from __future__ import annotations

import pytest

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.model.hub import check_model_dir, looks_like_path, resolve_model


def test_paths_and_ids_are_told_apart(tmp_path):
    assert (
        looks_like_path(str(tmp_path)) and looks_like_path("./runs/x") and looks_like_path("a/b/c")
    )
    assert not looks_like_path("qwen/Qwen1.5-4B-Chat")


def test_local_folder_resolves(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()


def test_missing_local_folder(tmp_path):
    with pytest.raises(MlxLoraError, match="does not exist.*--model DIR"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_with_only_bin_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MlxLoraError, match="only PyTorch .bin weights"):
        check_model_dir(tmp_path)


def test_unknown_source():
    with pytest.raises(MlxLoraError, match="unknown --model-source"):
        resolve_model("qwen/Qwen1.5-4B-Chat", "github")


def test_offline_hub_id_is_one_line_naming_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MlxLoraError) as e:
        resolve_model("nobody/no-such-model", "huggingface")
    msg = str(e.value)
    assert "'nobody/no-such-model'" in msg and "--model DIR" in msg and "\n" not in msg
