"""``--gradient-checkpointing auto|on|off``: the flag, and what auto decides and says."""

from __future__ import annotations

import pytest
from conftest import SAMPLE_DATA

from mlx_lora.config import TrainConfig, parse_config
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.plan.memory import Budget, examples_for, plan
from mlx_lora.plan.recompute import decide


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


def _plan(model, limit: float | None = None, **kw):
    cfg = TrainConfig(model=str(model), data=str(SAMPLE_DATA), **kw)
    budget = Budget(None if limit is None else int(limit), "test budget")
    return plan(cfg, examples_for(cfg, model), model_dir=model, budget=budget)


def test_explicit_settings_are_kept(tiny_model):
    p = _plan(tiny_model, 1)  # nothing fits: an explicit setting is still kept
    for setting in (True, False):
        d = decide(setting, p)
        assert d.on is setting and "as asked" in d.reason


def test_auto_follows_the_memory_budget(tiny_model):
    p = _plan(tiny_model, 64e9)
    d = decide(None, p)
    assert not d.on and d.reason.startswith("off (auto:") and "64.00 GB test budget" in d.reason
    between = (p.peak_bytes(False) + p.peak_bytes(True)) / 2 * 1.1
    d = decide(None, _plan(tiny_model, between))
    assert d.on and d.reason.startswith("on (auto: the run would need about")


def test_the_summary_says_which_and_why(tiny_model, tmp_path, monkeypatch, capsys):
    from mlx_lora.train.loop import train

    def run(out, **kw):
        return train(
            TrainConfig(
                model=str(tiny_model),
                data=str(SAMPLE_DATA),
                output_dir=str(tmp_path / out),
                max_steps=1,
                plot=False,
                **kw,
            ),
            progress=False,
        )

    p = _plan(tiny_model, max_steps=1)  # the plan of the run below
    between = (p.peak_bytes(False) + p.peak_bytes(True)) / 2 * 1.1
    monkeypatch.setenv("MLX_LORA_MEMORY_LIMIT", str(int(between)))
    assert run("small").gradient_checkpointing is True
    out = capsys.readouterr().out
    assert "gradient checkpointing on (auto: the run would need about" in out
    assert "memory plan:" in out and "→ fits" in out
    monkeypatch.delenv("MLX_LORA_MEMORY_LIMIT")
    assert run("big").gradient_checkpointing is False
    assert "gradient checkpointing off (auto:" in capsys.readouterr().out
    assert run("asked", gradient_checkpointing=True).gradient_checkpointing is True
    assert "gradient checkpointing on (as asked)" in capsys.readouterr().out
