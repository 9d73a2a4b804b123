"""Preference training: data forms, the objectives against numpy from the papers' formulas, the
packed forward against the plain one, step-0 identities, learning, resume, export."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import REPO
from mlx.utils import tree_flatten

from mlx_lora.config import TrainConfig, parse_config
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.preference import Pair, PromptRow, Unpaired, load_preference
from mlx_lora.export.pipeline import ExportConfig, export
from mlx_lora.model.load import load_base, load_base_tokenizer
from mlx_lora.model.lora import apply_lora
from mlx_lora.plan.footprint import KV_STEP, read_shape
from mlx_lora.plan.memory import Budget, plan
from mlx_lora.train.loop import train
from mlx_lora.train.preference import (
    Objective,
    PreferenceMethod,
    kto_loss,
    log1mexp,
    pair_loss,
    pref_batch,
)
from mlx_lora.train.rewards import load_rewards

SAMPLE = REPO / "dataset" / "preference_sample.json"


def write(tmp_path: Path, records: list, name: str = "d.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return p


def cfg(model, out, **kw):
    base = dict(
        model=str(model),
        data=str(SAMPLE),
        output_dir=str(out),
        method="dpo",
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        lora_dropout=0.0,
        max_seq_length=256,
        plot=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


# ---------------------------------------------------------------- data


def answer_text(tok, seq) -> str:
    return tok.decode([i for i, m in zip(seq.ids, seq.mask, strict=True) if m])


def test_forms_are_detected_and_only_the_answer_is_trained(tiny_model, tmp_path):
    tok = load_base_tokenizer(tiny_model)
    multi = [
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是甄嬛。"},
        {"role": "user", "content": "住在哪里？"},
    ]
    forms = {
        "preference": [{"prompt": "你好", "chosen": "臣妾在。", "rejected": "hi"}],
        "multi": [
            {
                "prompt": multi,
                "chosen": [{"role": "assistant", "content": "碎玉轩。"}],
                "rejected": [{"role": "assistant", "content": "朝阳区。"}],
            }
        ],
        "implicit": [
            {
                "chosen": [*multi, {"role": "assistant", "content": "碎玉轩。"}],
                "rejected": [*multi, {"role": "assistant", "content": "朝阳区。"}],
            }
        ],
        "ranking": [{"instruction": "你好", "input": "", "chosen": "臣妾在。", "rejected": "hi"}],
        "ranking_sharegpt": [
            {
                "conversations": [{"from": "human", "value": "你好"}],
                "chosen": {"from": "gpt", "value": "臣妾在。"},
                "rejected": {"from": "gpt", "value": "hi"},
            }
        ],
    }
    for name, records in forms.items():
        ds = load_preference(write(tmp_path, records), tok, "dpo")
        (pair,) = ds.examples
        assert isinstance(pair, Pair), name
        chosen = answer_text(tok, pair.chosen)
        assert chosen.startswith(("臣妾在。", "碎玉轩。")), (name, chosen)
        assert "我是甄嬛" not in chosen  # an assistant turn of the prompt is not trained on
        assert (
            pair.chosen.ids[: pair.chosen.prompt_len] == pair.rejected.ids[: pair.chosen.prompt_len]
        )
    assert load_preference(write(tmp_path, forms["ranking"]), tok, "dpo").format == "ranking"
    kto = [{"prompt": "你好", "completion": "臣妾在。", "label": True}]
    kto.append({"prompt": "你好", "completion": "hi", "label": False})
    ds = load_preference(write(tmp_path, kto), tok, "kto")
    assert ds.format == "kto" and [u.label for u in ds.examples] == [True, False]
    assert all(isinstance(u, Unpaired) for u in ds.examples)
    # pairs for KTO: one desirable, one undesirable row each (as TRL)
    ds = load_preference(write(tmp_path, forms["preference"]), tok, "kto")
    assert [u.label for u in ds.examples] == [True, False]
    rows = [{"prompt": "2+3=?", "answer": "5"}]
    (row,) = load_preference(write(tmp_path, rows), tok, "grpo").examples
    assert isinstance(row, PromptRow) and row.extras == {"answer": "5"}


@pytest.mark.parametrize(
    "records, method, message",
    [
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], "dpo",
         "record 2: rejected is missing"),
        ([{"prompt": "a", "chosen": "b", "rejected": ""}], "dpo", "record 1: rejected must be"),
        ([{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}], "dpo",
         "record 1: chosen must end with an assistant message"),
        ([{"prompt": "a", "completion": "b", "label": "yes"}], "kto", "record 1: label must be"),
        ([{"prompt": "a", "completion": "b", "label": True}], "kto", "both desirable"),
        ([{"prompt": "a", "completion": "b", "label": True}], "dpo", "needs preference or ranking"),
        ([{"instruction": "a", "output": "b"}], "dpo", "no preference records"),
    ],
)  # fmt: skip
def test_bad_record_is_a_numbered_one_line_error(tiny_model, tmp_path, records, method, message):
    tok = load_base_tokenizer(tiny_model)
    with pytest.raises(MlxLoraError, match=message) as e:
        load_preference(write(tmp_path, records), tok, method)
    assert "\n" not in str(e.value)


def test_flags_use_trl_names():
    c = parse_config(
        TrainConfig,
        "--method dpo --beta 0.2 --loss-type ipo --label-smoothing 0.1 --simpo-gamma 1.0".split(),
        "t",
        "",
    )
    assert (c.method, c.beta, c.loss_type, c.label_smoothing, c.simpo_gamma) == (
        "dpo", 0.2, "ipo", 0.1, 1.0,
    )  # fmt: skip


# ---------------------------------------------------------------- the formulas, in numpy


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1 / (1 + np.exp(-x))


def np_pair(o: Objective, pc, pr, rc, rr, nc, nr) -> float:
    """The papers' per-pair losses, summed (float64)."""
    b, eps = o.beta, o.label_smoothing
    ac, ar = pc / nc, pr / nr
    if o.method == "orpo":  # Hong et al. 2024, eq. 6-7
        odds = lambda a: a - np.log(1 - np.exp(a))  # noqa: E731
        return float(np.sum(-ac - b * logsig(odds(ac) - odds(ar))))
    if o.method == "simpo":  # Meng et al. 2024, eq. 6
        x = b * (ac - ar) - o.simpo_gamma
        return float(np.sum(-(1 - eps) * logsig(x) - eps * logsig(-x)))
    if o.loss_type == "ipo":  # Azar et al. 2023, eq. 17 (length-averaged, as TRL)
        h = (ac - ar) - (rc / nc - rr / nr)
        return float(np.sum((h - 1 / (2 * b)) ** 2))
    z = (pc - pr) - (rc - rr)  # Rafailov et al. 2023, eq. 7
    if o.loss_type == "hinge":
        return float(np.sum(np.maximum(0, 1 - b * z)))
    return float(np.sum(-(1 - eps) * logsig(b * z) - eps * logsig(-b * z)))


def np_kto(o: Objective, p, ref, kl_p, kl_ref, label) -> float:
    """Ethayarajh et al. 2024, eq. 8: value relative to the (detached) KL reference point."""
    z0 = max(0.0, float(np.mean(kl_p - kl_ref)))
    r = p - ref
    v = np.where(
        label > 0,
        o.desirable_weight * sig(o.beta * (r - z0)),
        o.undesirable_weight * sig(o.beta * (z0 - r)),
    )
    lam = np.where(label > 0, o.desirable_weight, o.undesirable_weight)
    return float(np.sum(lam - v))


def num_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        d = np.zeros_like(x)
        d.flat[i] = h
        g.flat[i] = (f(x + d) - f(x - d)) / (2 * h)
    return g


RNG = np.random.default_rng(0)
N = np.array([7.0, 11.0, 5.0])
PC, PR = -N * RNG.uniform(0.5, 2.0, 3), -N * RNG.uniform(0.5, 2.0, 3)
RC, RR = PC + RNG.normal(0, 0.8, 3), PR + RNG.normal(0, 0.8, 3)
OBJECTIVES = [
    Objective("dpo", 0.1),
    Objective("dpo", 0.5, label_smoothing=0.2),
    Objective("dpo", 0.1, loss_type="ipo"),
    Objective("dpo", 0.3, loss_type="hinge"),
    Objective("orpo", 0.1),
    Objective("simpo", 2.0, simpo_gamma=0.5),
    Objective("simpo", 2.5, simpo_gamma=1.0, label_smoothing=0.1),
]


@pytest.mark.parametrize("o", OBJECTIVES, ids=lambda o: f"{o.method}-{o.loss_type}-{o.beta}")
def test_pair_losses_and_gradients_equal_numpy(o):
    def mine(pc, pr):
        return pair_loss(o, pc, pr, mx.array(RC), mx.array(RR), mx.array(N), mx.array(N + 2))[0]

    (loss, (gc, gr)) = mx.value_and_grad(mine, argnums=(0, 1))(mx.array(PC), mx.array(PR))
    ref = np_pair(o, PC, PR, RC, RR, N, N + 2)
    assert abs(loss.item() - ref) <= 1e-5 * max(1, abs(ref))
    want_c = num_grad(lambda x: np_pair(o, x, PR, RC, RR, N, N + 2), PC)
    want_r = num_grad(lambda x: np_pair(o, PC, x, RC, RR, N, N + 2), PR)
    np.testing.assert_allclose(np.array(gc), want_c, atol=1e-5)
    np.testing.assert_allclose(np.array(gr), want_r, atol=1e-5)


def test_orpo_is_finite_as_the_mean_logp_goes_to_zero():
    """A model certain of every chosen token (ā = 0) gives log(1 − e^0) = −inf unclamped; the
    loss and its gradients stay finite, and log1mexp matches float64 below the clamp."""
    a = np.array([-1e-7, -1e-5, -0.01, -0.5, -0.7, -2.0, -30.0])
    np.testing.assert_allclose(
        np.array(log1mexp(mx.array(a))), np.log(-np.expm1(a)), rtol=1e-5, atol=1e-12
    )
    o = Objective("orpo", 0.1)
    n = mx.array([4.0, 4.0, 4.0])

    def f(pc, pr):
        return pair_loss(o, pc, pr, None, None, n, n)[0]

    for pc in ([0.0, -1e-9, -1e-6], [0.0, 0.0, 0.0]):
        loss, (gc, gr) = mx.value_and_grad(f, argnums=(0, 1))(mx.array(pc), mx.array([-8.0] * 3))
        assert math.isfinite(loss.item()), pc
        assert np.isfinite(np.array(gc)).all() and np.isfinite(np.array(gr)).all(), pc
    rejected = mx.array([0.0, -1e-9, -2.0])  # the rejected side near 0 as well
    loss, grads = mx.value_and_grad(f, argnums=(0, 1))(mx.array([-1.0] * 3), rejected)
    assert math.isfinite(loss.item()) and all(np.isfinite(np.array(g)).all() for g in grads)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.5)])
def test_kto_loss_and_gradient_equal_numpy(weights):
    o = Objective("kto", 0.1, desirable_weight=weights[0], undesirable_weight=weights[1])
    label = np.array([1.0, 0.0, 1.0])
    kl_p, kl_ref = PR, PR - np.array([0.5, 1.0, 2.0])  # mean KL 1.1 > 0: z0 matters

    def mine(p):
        return kto_loss(o, p, mx.array(RC), mx.array(kl_p), mx.array(kl_ref), mx.array(label))[0]

    loss, g = mx.value_and_grad(mine)(mx.array(PC))
    ref = np_kto(o, PC, RC, kl_p, kl_ref, label)
    assert abs(loss.item() - ref) <= 1e-5
    want = num_grad(lambda x: np_kto(o, x, RC, kl_p, kl_ref, label), PC)
    np.testing.assert_allclose(np.array(g), want, atol=1e-5)


def test_dpo_metrics_are_trl_s():
    o = Objective("dpo", 0.1)
    n = mx.array(N)
    _, m = pair_loss(o, mx.array(PC), mx.array(PR), mx.array(RC), mx.array(RR), n, n)
    wc, wr = 0.1 * (PC - RC), 0.1 * (PR - RR)
    assert abs(m["rewards/chosen"].item() - wc.sum()) < 1e-5
    assert abs(m["rewards/margins"].item() - (wc - wr).sum()) < 1e-5
    assert m["rewards/accuracies"].item() == (wc > wr).sum()
    assert abs(m["logps/rejected"].item() - PR.sum()) < 1e-4


# ---------------------------------------------------------------- the packed forward


def plain_logps(model, seq) -> float:
    """Sum of the answer tokens' log-probs from mlx-lm's own forward (full logits, numpy)."""
    logits = np.array(model(mx.array([seq.ids]))[0].astype(mx.float32), dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return sum(logp[t - 1, seq.ids[t]] for t in range(1, len(seq.ids)) if seq.mask[t])


def test_packed_sequence_logps_and_gradients_equal_the_plain_forward(tiny_model):
    """One packed forward of chosen + rejected gives each sequence's log-prob as the model's own
    forward does, and the DPO gradient of the LoRA weights is the one of the plain forward."""
    tok = load_base_tokenizer(tiny_model)
    model, _, _ = load_base(tiny_model, dtype=mx.float32, tokenizer=tok)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8.0, 0.0)
    mx.random.seed(3)  # nonzero B: the policy differs from the reference
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            m.lora_B = mx.random.normal(m.lora_B.shape) * 0.05
    model.eval()
    pairs = load_preference(SAMPLE, tok, "dpo", max_seq_length=256).examples[:3]
    o = Objective("dpo", 0.1)
    method = PreferenceMethod(o)
    b = pref_batch(pairs, 256, True, 0, pad_to=1, lanes=2)
    seq = method._seq_logps(model, b, tuple(map(mx.array, (
        b.batch.inputs, b.batch.segments, b.batch.targets, b.batch.labels))))  # fmt: skip
    want = [plain_logps(model, p.chosen) for p in pairs] + [
        plain_logps(model, p.rejected) for p in pairs
    ]
    np.testing.assert_allclose(np.array(seq), want, rtol=1e-5, atol=1e-4)
    ref = method.reference_logps(model, b)

    def plain_loss(m):
        def lp(s):
            logits = m(mx.array([s.ids]))[0].astype(mx.float32)
            ce = nn.losses.cross_entropy(logits[:-1], mx.array(s.ids[1:]))
            return -(ce * mx.array(s.mask[1:], dtype=mx.float32)).sum()

        pc = mx.stack([lp(p.chosen) for p in pairs])
        pr = mx.stack([lp(p.rejected) for p in pairs])
        n = mx.array(b.owner.sum(axis=1))
        return pair_loss(o, pc, pr, ref[:3], ref[3:], n[:3], n[3:])[0]

    (l1, _), g1 = nn.value_and_grad(model, lambda m: method.loss(m, b, ref))(model)
    l2, g2 = nn.value_and_grad(model, plain_loss)(model)
    assert abs(l1.item() - l2.item()) < 1e-5
    for (k, a), (_, c) in zip(tree_flatten(g1), tree_flatten(g2), strict=True):
        assert mx.abs(a - c).max().item() < 1e-5, k


# ---------------------------------------------------------------- training runs


def test_step_zero_dpo_loss_is_ln2_and_rewards_zero(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path / "r", max_steps=1), progress=False)
    first = history(tmp_path / "r")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[k] == 0.0, (k, first)
    assert first["rewards/accuracies"] == 0.0  # ties are not wins (TRL: chosen > rejected)
    assert {"logps/chosen", "logps/rejected", "grad_norm"} <= set(first)


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_other_methods_train_and_log(tiny_model, tmp_path, method):
    train(cfg(tiny_model, tmp_path / method, method=method, max_steps=3), progress=False)
    logs = [h for h in history(tmp_path / method) if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(logs[0])
    assert (tmp_path / method / "adapter_model.safetensors").is_file()


def test_dpo_learns_the_sample_pairs(tiny_model, tmp_path):
    """After training, reward accuracy on the training pairs ≥ 0.9 and the chosen answers'
    log-prob has risen above the reference's (rewards/chosen > 0)."""
    out = tmp_path / "learn"
    train(
        cfg(
            tiny_model, out, max_steps=40, save_steps=40, logging_steps=10,
            per_device_train_batch_size=8, learning_rate=5e-3, lora_r=16, beta=0.5,
            eval_data=str(SAMPLE), eval_steps=40,
        ),
        progress=False,
    )  # fmt: skip
    final = [h for h in history(out) if "eval_loss" in h][-1]
    assert final["eval_rewards/accuracies"] >= 0.9, final
    assert final["eval_rewards/chosen"] > 0, final
    assert final["eval_loss"] < math.log(2)


def test_resume_is_exact(tiny_model, tmp_path):
    whole = tmp_path / "whole"
    train(cfg(tiny_model, whole, max_steps=4, save_steps=2), progress=False)
    part = tmp_path / "part"
    train(cfg(tiny_model, part, max_steps=4, save_steps=2), progress=False)
    # stop after checkpoint-2: drop the later files, then resume
    shutil.rmtree(part / "checkpoint-4")
    (part / "adapter_model.safetensors").unlink()
    train(cfg(tiny_model, part, max_steps=4, save_steps=2, resume="latest"), progress=False)
    a = mx.load(str(whole / "adapter_model.safetensors"))
    b = mx.load(str(part / "adapter_model.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) == 0.0
    with pytest.raises(MlxLoraError, match="method"):
        train(cfg(tiny_model, part, max_steps=6, method="orpo", resume="latest"), progress=False)


def test_eval_at_end_scores_the_chosen_answers(tiny_model, tmp_path):
    """--eval-at-end after DPO: base vs tuned loss on the held-out pairs' chosen answers (GRPO,
    prompts only, is refused before anything loads)."""
    out = tmp_path / "dpo"
    train(cfg(tiny_model, out, max_steps=2, val_split=0.1, eval_at_end=True), progress=False)
    rep = json.loads((out / "eval.json").read_text())
    assert rep["examples"] == 6 and rep["target_tokens"] > 0
    assert math.isfinite(rep["base_loss"]) and math.isfinite(rep["tuned_loss"])
    with pytest.raises(MlxLoraError, match="GRPO's data has prompts only"):
        train(cfg(tiny_model, tmp_path / "g", method="grpo", val_split=0.1, eval_at_end=True,
                  reward="json"), progress=False)  # fmt: skip


def test_ref_adapter_starts_the_policy_and_is_the_reference(tiny_model, tmp_path):
    sft = tmp_path / "sft"
    train(
        TrainConfig(
            model=str(tiny_model), output_dir=str(sft), max_steps=3, save_steps=3,
            per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-3,
            lora_dropout=0.0, max_seq_length=256, plot=False,
        ),
        progress=False,
    )  # fmt: skip
    out = tmp_path / "dpo"
    train(cfg(tiny_model, out, max_steps=1, ref_adapter=str(sft)), progress=False)
    first = history(out)[0]  # policy = reference at step 0: ln 2 again
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/chosen"] == 0.0


def test_dpo_adapter_fuses_and_exports_with_verify(tiny_model, tmp_path):
    out = tmp_path / "dpo"
    train(cfg(tiny_model, out, max_steps=4), progress=False)
    gguf = importlib.util.find_spec("llama_cpp") is not None
    kw = dict(gguf_type="f32") if gguf else dict(format="mlx")
    r = export(
        ExportConfig(adapter=str(out), output_dir=str(tmp_path / "exp"), verify=True, **kw),
        progress=False,
    )
    assert r.report.ok, r.report.table()
    if gguf:  # llama.cpp itself read the f32 GGUF: its logits and greedy tokens match MLX's
        table = r.report.table()
        assert "logits llama.cpp vs MLX" in table and "greedy 32 tokens" in table, table
        assert "skipped" not in table, table


# ---------------------------------------------------------------- GRPO

REWARDS = """
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def broken(prompts, completions, **kw):
    raise ValueError("no")
"""
PROMPTS = ["你好", "你是谁？", "今天天气如何？", "讲个故事", "你喜欢什么花？", "皇上来了吗？"]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": p, "answer": "1"} for p in PROMPTS]
    return write(tmp_path, rows, "prompts.json")


def grpo_cfg(model, data, out, **kw):
    kw = {"reward": "my_rewards:vowels", **kw}
    return cfg(
        model, out, data=str(data), method="grpo", num_generations=4,
        max_completion_length=16, per_device_train_batch_size=2, learning_rate=1e-2, **kw,
    )  # fmt: skip


def test_grpo_mean_reward_rises(tiny_model, tmp_path, reward_module):
    out = tmp_path / "grpo"
    train(grpo_cfg(tiny_model, reward_module, out, max_steps=16, logging_steps=4, save_steps=16),
          progress=False)  # fmt: skip
    logs = [h for h in history(out) if "reward" in h]
    assert {"rewards/vowels/mean", "reward_std", "completion_length", "kl"} <= set(logs[0])
    assert logs[-1]["reward"] > logs[0]["reward"] + 0.02, [h["reward"] for h in logs]


def test_grpo_resume_is_exact(tiny_model, tmp_path, reward_module):
    """Stopped after checkpoint-2 and resumed: the same sampled answers, the same adapter, bit for
    bit (the sampling seed comes from the step's RNG, which the checkpoint restores)."""
    kw = dict(max_steps=4, save_steps=2, beta=0.05)
    whole = tmp_path / "whole"
    train(grpo_cfg(tiny_model, reward_module, whole, **kw), progress=False)
    part = tmp_path / "part"
    train(grpo_cfg(tiny_model, reward_module, part, **kw), progress=False)
    shutil.rmtree(part / "checkpoint-4")
    (part / "adapter_model.safetensors").unlink()
    train(grpo_cfg(tiny_model, reward_module, part, resume="latest", **kw), progress=False)
    a = mx.load(str(whole / "adapter_model.safetensors"))
    b = mx.load(str(part / "adapter_model.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) == 0.0
    rewards = lambda out: [h["reward"] for h in history(out) if "reward" in h]  # noqa: E731
    assert rewards(whole)[-2:] == rewards(part)[-2:]


def test_plan_counts_pairs_and_grpo_s_generation_cache(tiny_model, tmp_path, reward_module):
    """Two sequences per pair; GRPO: the group of answers, plus the sampling's KV cache (prompt +
    --max-completion-length tokens of every block, in mlx-lm's 256-token steps) while the
    weights and optimizer state stay resident."""
    tok = load_base_tokenizer(tiny_model)
    big = Budget(10**12, "test")
    sft = plan(cfg(tiny_model, tmp_path, method="sft"), budget=big, gpu=False)
    dpo = plan(cfg(tiny_model, tmp_path), budget=big, gpu=False)  # no data: worst-case batches
    assert dpo.batches[0].tokens == 2 * sft.batches[0].tokens
    rows = load_preference(reward_module, tok, "grpo").examples
    shape = read_shape(tiny_model)
    for n in (16, 700):
        c = replace(grpo_cfg(tiny_model, reward_module, tmp_path), max_completion_length=n)
        p = plan(c, rows, budget=big, gpu=False)
        assert p.prompt_tokens == max(len(r.ids) for r in rows)
        kv = shape.layers * 2 * shape.kv_heads * shape.head_dim * 4
        steps = -(-(p.prompt_tokens + n) // KV_STEP) * KV_STEP
        assert p.generation_bytes() >= kv * steps
        assert "generation" in p.report() and f"{p.prompt_tokens + n:,} tokens" in p.report()
    sft_gen = plan(TrainConfig(model=str(tiny_model)), budget=big, gpu=False)
    assert sft_gen.generation_bytes() == 0 and "generation" not in sft_gen.report()


def test_grpo_failing_reward_names_itself_and_the_record(tiny_model, tmp_path, reward_module):
    c = grpo_cfg(tiny_model, reward_module, tmp_path / "x", max_steps=1, reward="my_rewards:broken")
    with pytest.raises(MlxLoraError, match=r"reward broken failed on record \d+: ValueError: no"):
        train(c, progress=False)


def test_builtin_rewards():
    fmt, js, ex, num = load_rewards("format,json,exact,numeric", r"<answer>.*</answer>")
    comps = ["<answer>5</answer>", '{"a": 1}', "5", "so it is 4.0"]
    assert fmt(["p"] * 4, comps, {}, 1) == [1.0, 0.0, 0.0, 0.0]
    assert js(["p"] * 4, comps, {}, 1) == [0.0, 1.0, 1.0, 0.0]
    assert ex(["p"] * 4, comps, {"answer": "5"}, 1) == [0.0, 0.0, 1.0, 0.0]
    assert num(["p"] * 4, comps, {"answer": 4}, 1) == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(MlxLoraError, match="reward exact failed on record 3: .*'answer' column"):
        ex(["p"], ["5"], {}, 3)
