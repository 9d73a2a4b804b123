"""``--gradient-checkpointing auto|on|off``: the flag, and what auto decides and says."""

from __future__ import annotations

import pytest
from conftest import SAMPLE_DATA

from mlx_lora.config import TrainConfig, parse_config
from mlx_lora.errors import MlxLoraError
from mlx_lora.recompute import activation_bytes, decide, parse_bytes

SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),
        (["--gradient-checkpointing"], True),
        (["--gradient-checkpointing", "auto"], None),
        (["--gradient-checkpointing", "on"], True),
        (["--gradient-checkpointing", "off"], False),
        (["--no-gradient-checkpointing"], False),
    ],
)
def test_flag_forms(argv, expected):
    assert parse_config(TrainConfig, argv, "p", "d").gradient_checkpointing is expected


def test_yaml_values_and_a_bad_value(tmp_path):
    y = tmp_path / "t.yaml"
    for text, expected in (("auto", None), ("true", True), ("off", False), ("false", False)):
        y.write_text(f"gradient_checkpointing: {text}\n")
        assert parse_config(TrainConfig, ["--config", str(y)], "p", "d").gradient_checkpointing is (
            expected
        )
    with pytest.raises(MlxLoraError, match="expected auto, on or off"):
        parse_config(TrainConfig, ["--gradient-checkpointing", "maybe"], "p", "d")
    y.write_text("gradient_checkpointing: sometimes\n")
    with pytest.raises(MlxLoraError, match="gradient_checkpointing: expected auto, on or off"):
        parse_config(TrainConfig, ["--config", str(y)], "p", "d")


def test_explicit_settings_are_kept():
    for setting in (True, False):
        d = decide(setting, SMOLLM2, [100] * 8, [40] * 8, 4, 10**9, 4)
        assert d.on is setting and "as asked" in d.reason


def test_auto_follows_the_memory_limit(monkeypatch):
    lengths, targets = [300, 120, 80, 60, 2000], [100, 40, 30, 20, 900]
    worst = activation_bytes(SMOLLM2, [2000, 300, 120, 80], 1070, 4)
    assert worst > activation_bytes(SMOLLM2, [300, 120, 80, 60], 190, 4) > 0
    monkeypatch.setenv("MLX_LORA_MEMORY_LIMIT", "64GB")
    d = decide(None, SMOLLM2, lengths, targets, 4, 600 * 10**6, 4)
    assert not d.on and d.reason.startswith("off (auto:") and "64.0 GB available" in d.reason
    monkeypatch.setenv("MLX_LORA_MEMORY_LIMIT", "2GB")  # the 4 longest examples do not fit
    d = decide(None, SMOLLM2, lengths, targets, 4, 600 * 10**6, 4)
    assert d.on and d.reason.startswith("on (auto:")


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5g") == 1_500_000_000
    assert parse_bytes("4096") == 4096


def test_the_summary_says_which_and_why(tiny_model, tmp_path, monkeypatch, capsys):
    from mlx_lora.train import train

    def run(out, **kw):
        return train(
            TrainConfig(
                model=str(tiny_model),
                data=str(SAMPLE_DATA),
                output_dir=str(tmp_path / out),
                max_steps=1,
                gradient_accumulation_steps=1,
                plot=False,
                **kw,
            ),
            progress=False,
        )

    monkeypatch.setenv("MLX_LORA_MEMORY_LIMIT", "1MB")
    assert run("small").gradient_checkpointing is True
    assert (
        "gradient checkpointing on (auto: the largest batch would need" in capsys.readouterr().out
    )
    monkeypatch.delenv("MLX_LORA_MEMORY_LIMIT")
    assert run("big").gradient_checkpointing is False
    assert "gradient checkpointing off (auto:" in capsys.readouterr().out
    assert run("asked", gradient_checkpointing=True).gradient_checkpointing is True
    assert "gradient checkpointing on (as asked)" in capsys.readouterr().out
