"""Dataset reading, format detection, template rendering and the loss mask."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_DATA

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import (
    detect_format,
    load_dataset,
    make_batch,
    read_records,
    split,
    to_messages,
)
from mlx_lora.model.prompt import build_prompt, encode_conversation, end_of_turn

IM_END, IM_START = 151645, 151644


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- formats

RECORDS = {
    "alpaca": {"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"},
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "皇上万福。"},
        ]
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    },
    "completions": {"prompt": "1+1=", "completion": "2"},
    "text": {"text": "Once upon a time."},
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_detect_each_format(fmt):
    assert detect_format([RECORDS[fmt]]) == fmt


def test_unknown_format_lists_keys():
    with pytest.raises(MlxLoraError, match="keys seen: question, answer"):
        detect_format([{"question": "q", "answer": "a"}])


def test_alpaca_with_input_system_and_history():
    rec = {
        "system": "SYS",
        "instruction": "翻译",
        "input": "hello",
        "output": "你好",
        "history": [["q1", "a1"]],
    }
    assert to_messages(rec, "alpaca") == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"},
    ]


def test_sharegpt_roles_mapped():
    assert to_messages(RECORDS["sharegpt"], "sharegpt") == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "皇上万福。"},
    ]


@pytest.mark.parametrize(
    "rec",
    [
        {"instruction": "", "output": "x"},
        {"instruction": "q"},
        {"instruction": "q", "output": 3},
        "str",
    ],
)
def test_bad_alpaca_records_are_unusable(rec):
    assert to_messages(rec, "alpaca") is None


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_renders_with_the_template(tmp_path, tiny_model, fmt):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    path = write(tmp_path, "d.jsonl", json.dumps(RECORDS[fmt], ensure_ascii=False) + "\n")
    ds = load_dataset(path, tok)
    assert ds.format == fmt and len(ds.examples) == 1
    text = tok.decode(ds.examples[0].ids)
    if fmt == "text":
        assert text.startswith("Once upon a time.") and all(ds.examples[0].mask)
    else:
        assert "<|im_start|>assistant\n" in text and text.endswith("<|im_end|>")
        answer = tok.decode(
            [i for i, m in zip(ds.examples[0].ids, ds.examples[0].mask, strict=True) if m]
        )
        expected = {
            "alpaca": "我是甄嬛。",
            "sharegpt": "皇上万福。",
            "messages": "yo",
            "completions": "2",
        }[fmt]
        assert answer == expected + "<|im_end|>"
    if fmt == "messages":
        assert "<|im_start|>system\nS<|im_end|>" in text
    elif fmt != "text":
        assert "You are a helpful assistant" in text  # the template's own default system


def test_system_prompt_flag_applies_to_every_example(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ds = load_dataset(SAMPLE_DATA, tok, system_prompt="假设你是皇帝身边的女人--甄嬛。")
    assert all("假设你是皇帝身边的女人--甄嬛。" in tok.decode(e.ids) for e in ds.examples)
    assert not any("You are a helpful assistant" in tok.decode(e.ids) for e in ds.examples)


# --------------------------------------------------------------- the loss mask, real Qwen tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "皇上好，我是甄嬛。"}],
    [
        {"role": "system", "content": "你是甄嬛。"},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "def f():\n    return 1  # 😀"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": " leading space and trailing\n"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_loss_mask_covers_exactly_assistant_turns_and_im_end(qwen_tokenizer, conv):
    tok = qwen_tokenizer
    assert end_of_turn(tok) == "<|im_end|>"
    enc = encode_conversation(tok, conv)
    # Expected ids: the template text with each assistant turn closed by <|im_end|>.
    text = tok.apply_chat_template(conv, tokenize=False)
    if not text.endswith("<|im_end|>\n"):
        text += "<|im_end|>"  # Qwen1.5 leaves the last turn open; we must close it
    assert enc.ids == tok(text, add_special_tokens=False)["input_ids"]
    # Masked tokens, split at <|im_end|>, are exactly the assistant contents.
    spans, cur = [], []
    for i, m in zip(enc.ids, enc.mask, strict=True):
        if m:
            cur.append(i)
            if i == IM_END:
                spans.append(cur)
                cur = []
        else:
            assert not cur, "a masked span ended without <|im_end|>"
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [a + "<|im_end|>" for a in answers]
    # Nothing else: no role header, no newline after <|im_end|>, no user or system token.
    assert sum(enc.mask) == sum(len(s) for s in spans)
    assert enc.ids[-1] == IM_END and enc.mask[-1]


def test_training_prefix_equals_the_chat_prompt(qwen_tokenizer):
    """What chat feeds the model before each answer is token for token what training saw."""
    conv = CONVERSATIONS[1]
    enc = encode_conversation(qwen_tokenizer, conv)
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            prompt = build_prompt(qwen_tokenizer, conv[:i])
            assert enc.ids[: len(prompt)] == prompt
            assert not enc.mask[len(prompt) - 1]
            assert enc.mask[len(prompt)]
    assert build_prompt(qwen_tokenizer, conv[:1]) == list(
        qwen_tokenizer.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
    )


# ---------------------------------------------------------------- files and errors


def test_malformed_json_reports_line_and_column(tmp_path):
    p = write(
        tmp_path,
        "d.json",
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]',
    )
    with pytest.raises(MlxLoraError, match=r"d\.json:3:23: invalid JSON"):
        read_records(p)


def test_jsonl_bad_line(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(MlxLoraError, match=r"d\.jsonl:2:"):
        read_records(p)


def test_not_utf8(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes('[{"text": "你好"}]'.encode("gbk"))
    with pytest.raises(MlxLoraError, match="not UTF-8"):
        read_records(p)


@pytest.mark.parametrize(
    "content,msg", [("", "empty"), ("[]", "dataset is empty"), ("  \n", "empty")]
)
def test_empty(tmp_path, tiny_model, content, msg):
    from mlx_lm.utils import load_tokenizer

    with pytest.raises(MlxLoraError, match=msg):
        load_dataset(write(tmp_path, "d.json", content), load_tokenizer(tiny_model))


def test_missing_file():
    with pytest.raises(MlxLoraError, match="not found"):
        read_records("/nonexistent/d.json")


def test_missing_fields_skipped_and_counted(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    recs = [
        {"instruction": "q", "output": "a"},
        {"instruction": "q", "output": ""},
        {"instruction": "q"},
    ]
    ds = load_dataset(write(tmp_path, "d.json", json.dumps(recs)), load_tokenizer(tiny_model))
    assert (len(ds.examples), ds.skipped, ds.skipped_lines) == (1, 2, [2, 3])
    with pytest.raises(MlxLoraError, match="all 2 records were skipped"):
        load_dataset(write(tmp_path, "e.json", json.dumps(recs[1:])), load_tokenizer(tiny_model))


def test_truncation_counted(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    recs = [{"instruction": "q", "output": "很长的回答" * 50}, {"instruction": "q", "output": "短"}]
    ds = load_dataset(
        write(tmp_path, "d.json", json.dumps(recs, ensure_ascii=False)),
        load_tokenizer(tiny_model),
        max_seq_length=40,
    )
    assert ds.truncated == 1 and max(len(e.ids) for e in ds.examples) == 40


def test_split_is_seeded():
    a = split(100, 0.1, 3)
    assert (a[0] == split(100, 0.1, 3)[0]).all() and len(a[1]) == 10
    assert not (a[1] == split(100, 0.1, 4)[1]).all()
    assert sorted([*a[0], *a[1]]) == list(range(100))


def test_packing_layout_keeps_examples_apart():
    from mlx_lora.model.prompt import Encoded

    exs = [
        Encoded([1, 2, 3], [False, True, True]),
        Encoded([4, 5], [False, True]),
        Encoded([6] * 30, [True] * 30),
    ]
    packed, plain = make_batch(exs, 32, packing=True), make_batch(exs, 32, packing=False)
    assert packed.inputs.shape[0] == 2 and plain.inputs.shape[0] == 3  # [30, 2] and [3]
    assert packed.segments[0, :32].tolist() == [0] * 30 + [1] * 2
    assert packed.n_target_tokens == plain.n_target_tokens == 2 + 1 + 29
    assert sorted(packed.labels[packed.weights > 0].tolist()) == sorted(
        plain.labels[plain.weights > 0].tolist()
    )
