"""Fuzzing the dataset pipeline (and the Modelfile quoting): a valid result or a clean error, never
a crash.

Users feed ``mlx_lora.train`` whatever they have: exports from other tools, hand-edited files, text
with quotes, backslashes, CR/LF, control and combining characters, very long answers. For random
bytes, random JSON and random records with odd keys and types, every stage must either return
something that keeps its invariants or raise :class:`MlxLoraError` (one line); any other exception
is a bug.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import (
    SFT_FORMATS as FORMATS,  # what SFT's reader takes (preference forms: test_preference)
)
from mlx_lora.data.dataset import (
    detect_format,
    load_dataset,
    make_batch,
    read_records,
    to_messages,
)

_BASE = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(n: int) -> settings:
    """``n`` examples, times MLX_LORA_FUZZ_SCALE for a longer hunt (e.g. 50 before a release)."""
    return settings(_BASE, max_examples=n * int(os.environ.get("MLX_LORA_FUZZ_SCALE", "1")))


# ------------------------------------------------------------------------------- strategies

PIECES = [
    '"',
    '"""',
    "'",
    "\\",
    "\\n",
    "\\u0000",
    "\r\n",
    "\r",
    "\n",
    "\t",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x00",
    "\x1b[31m",
    "\x7f",
    "e\u0301",
    "\u0301",
    "\u200d",
    "\u200b",
    "\ufeff",
    "\u00ad",
    "👩🏽‍🚀",
    "<|im_end|>",
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "{{ messages }}",
    "{% if true %}",
    "{#",
    "</s>",
    "甄嬛",
    "皇上",
    " ",
    "  ",
    "null",
    "[",
    "{",
    "}",
    "]",
    ",",
    ":",
]
AWKWARD = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.one_of(st.sampled_from(PIECES), st.characters(exclude_categories=("Cs",))), max_size=30
    ).map("".join),
)
LONG = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(200, 2500))
TEXT = st.one_of(AWKWARD, AWKWARD, LONG)
LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT)
KNOWN_KEYS = [
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "prompt",
    "completion",
    "text",
    "from",
    "value",
    "role",
    "content",
    "data",
    "train",
]
KEY = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
JSON = st.recursive(
    LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEY, inner, max_size=4)),
    max_leaves=12,
)
WORDS = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=6)), min_size=1, max_size=12
).map(lambda parts: "答" + "".join(parts))  # never blank: a usable field with awkward content
TEXTISH = st.one_of(
    WORDS, WORDS, WORDS, TEXT, LEAF, JSON
)  # mostly usable text, sometimes blank or the wrong type
ROLE = st.one_of(
    st.sampled_from(
        ["user", "assistant", "system", "human", "gpt", "bot", "model", "USER", "tool", ""]
    ),
    LEAF,
)


def _turns(role_key: str, content_key: str) -> st.SearchStrategy:
    turn = st.fixed_dictionaries({role_key: ROLE, content_key: TEXTISH})
    return st.one_of(st.lists(turn, max_size=5), JSON)


RECORD = st.one_of(
    st.fixed_dictionaries(
        {"instruction": TEXTISH, "output": TEXTISH},
        optional={
            "input": TEXTISH,
            "system": TEXTISH,
            "history": st.one_of(st.lists(st.lists(TEXTISH, max_size=3), max_size=3), JSON),
        },
    ),
    st.fixed_dictionaries({"conversations": _turns("from", "value")}),
    st.fixed_dictionaries({"messages": _turns("role", "content")}),
    st.fixed_dictionaries({"prompt": TEXTISH, "completion": TEXTISH}),
    st.fixed_dictionaries({"text": TEXTISH}),
    st.dictionaries(KEY, JSON, max_size=5),
    JSON,
)


def _chat(role_key: str, content_key: str, user: str, assistant: str) -> st.SearchStrategy:
    def build(system: str | None, pairs: list[tuple[str, str]]) -> list[dict]:
        turns = [{role_key: "system", content_key: system}] if system else []
        for q, a in pairs:
            turns += [{role_key: user, content_key: q}, {role_key: assistant, content_key: a}]
        return turns

    return st.builds(
        build,
        st.one_of(st.none(), WORDS),
        st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=3),
    )


PLAUSIBLE = {  # well-formed records of each format, with awkward text inside
    "alpaca": st.fixed_dictionaries(
        {"instruction": WORDS, "output": WORDS},
        optional={
            "input": TEXTISH,
            "system": TEXTISH,
            "history": st.lists(st.lists(WORDS, min_size=2, max_size=2), max_size=2),
        },
    ),
    "sharegpt": st.fixed_dictionaries({"conversations": _chat("from", "value", "human", "gpt")}),
    "messages": st.fixed_dictionaries({"messages": _chat("role", "content", "user", "assistant")}),
    "completions": st.fixed_dictionaries({"prompt": WORDS, "completion": WORDS}),
    "text": st.fixed_dictionaries({"text": WORDS}),
}
DATASET = st.sampled_from(sorted(PLAUSIBLE)).flatmap(
    lambda f: st.lists(st.one_of(PLAUSIBLE[f], PLAUSIBLE[f], PLAUSIBLE[f], RECORD), max_size=6)
)

# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lora.model.load import load_base

    return load_base(tiny_model)[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A writer of uniquely named files (hypothesis runs many examples inside one test call)."""
    root = tmp_path_factory.mktemp("fuzz")
    counter = itertools.count()

    def write(data: bytes, suffix: str) -> Path:
        path = root / f"f{next(counter)}{suffix}"
        path.write_bytes(data)
        return path

    return write


def _dump(records: list, suffix: str, ascii_only: bool) -> bytes:
    """A .json array or .jsonl lines, as Python's json module (and most exporters) write them."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records).encode(
            "utf-8"
        )
    return json.dumps(records, ensure_ascii=ascii_only, indent=1).encode("utf-8")


def _one_line(e: MlxLoraError) -> None:
    assert str(e) and "\n" not in str(e), repr(str(e))


def _check_messages(item: object) -> None:
    if item is None or isinstance(item, str):
        return
    assert isinstance(item, list) and item
    for m in item:
        assert set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
        assert isinstance(m["content"], str) and m["content"].strip()


# ------------------------------------------------------------------------------- the reader


@fuzz(300)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    b"[",
                    b"]",
                    b"{",
                    b"}",
                    b'"',
                    b":",
                    b",",
                    b"\n",
                    b"\r\n",
                    b"\\",
                    b"\xef\xbb\xbf",
                    b"\xff\xfe",
                    b"\x00",
                    b"\xe4\xbd",
                    b"null",
                    b"NaN",
                    b"-Infinity",
                    b"1e999",
                    b"-0",
                    b'"instruction"',
                    b'"output"',
                    b'"text"',
                    b'"a"',
                    b" ",
                    b"\t",
                    b"\xe2\x80\xa8",
                ]
            ),
            max_size=40,
        ).map(b"".join),
    ),
    suffix=st.sampled_from([".json", ".jsonl", ".txt", ""]),
)
@example(data=b"[" * 100_000, suffix=".json")  # nesting deep enough to hit Python's recursion limit
@example(data=b"[" * 100_000, suffix=".jsonl")
@example(data=b"\xef\xbb\xbf", suffix=".json")
@example(data='[{"text": "甄嬛"}]'.encode("utf-16"), suffix=".json")
def test_random_bytes_are_records_or_a_clean_error(files, data, suffix):
    path = files(data, suffix)
    try:
        records = read_records(path)
    except MlxLoraError as e:
        _one_line(e)
        return
    assert isinstance(records, list)
    try:
        fmt = detect_format(records, path)
    except MlxLoraError as e:
        _one_line(e)
        return
    assert fmt in FORMATS
    for r in records:
        _check_messages(to_messages(r, fmt))


@fuzz(200)
@given(value=JSON, suffix=st.sampled_from([".json", ".jsonl"]), ascii_only=st.booleans())
def test_random_json_values(files, value, suffix, ascii_only):
    if suffix == ".jsonl" and isinstance(value, list):
        raw = _dump(value, suffix, ascii_only)
    else:
        raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    try:
        records = read_records(files(raw, suffix))
    except MlxLoraError as e:
        _one_line(e)
        return
    assert isinstance(records, list)
    for fmt in FORMATS[1:]:
        for r in records:
            _check_messages(to_messages(r, fmt))


@fuzz(200)
@given(
    records=st.lists(
        st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT}),
        min_size=1,
        max_size=5,
    ),
    suffix=st.sampled_from([".json", ".jsonl"]),
    ascii_only=st.booleans(),
)
@example(
    records=[{"instruction": "a\u2028b", "output": "c\x85d\x1ce"}],
    suffix=".jsonl",
    ascii_only=False,
)
@example(
    records=[{"instruction": 'say "hi"\\', "output": "line1\r\nline2\rline3"}],
    suffix=".jsonl",
    ascii_only=False,
)
def test_what_json_writes_is_read_back_exactly(files, records, suffix, ascii_only):
    """Any text survives a round trip through a .json or .jsonl file written by Python's json module
    (ensure_ascii=False leaves U+2028, U+0085, ... raw inside strings, which are valid JSON)."""
    assert read_records(files(_dump(records, suffix, ascii_only), suffix)) == records


@fuzz(300)
@given(record=RECORD, fmt=st.sampled_from(FORMATS[1:]))
def test_to_messages_never_crashes(record, fmt):
    _check_messages(to_messages(record, fmt))


# ------------------------------------------------------------------------------- the whole pipeline


@fuzz(120)
@given(
    records=st.one_of(DATASET, DATASET, st.lists(RECORD, max_size=6)),
    suffix=st.sampled_from([".json", ".jsonl"]),
    ascii_only=st.booleans(),
    fmt=st.one_of(st.just("auto"), st.sampled_from(FORMATS)),
    system_prompt=st.one_of(st.none(), AWKWARD),
    max_seq_length=st.one_of(st.just(2048), st.integers(41, 4096), st.integers(-2, 40)),
)
def test_load_dataset_gives_examples_or_a_clean_error(
    tokenizer, files, records, suffix, ascii_only, fmt, system_prompt, max_seq_length
):
    path = files(_dump(records, suffix, ascii_only), suffix)
    try:
        ds = load_dataset(
            path, tokenizer, fmt=fmt, system_prompt=system_prompt, max_seq_length=max_seq_length
        )
    except MlxLoraError as e:
        _one_line(e)
        event(f"error: {str(e).split(': ', 1)[-1][:40]}")
        return
    event(f"dataset with {min(len(ds.examples), 3)}+ examples")
    assert ds.records == len(records) and ds.format in FORMATS[1:]
    assert len(ds.examples) + ds.skipped + ds.dropped_no_target == ds.records
    assert ds.examples and len(ds.skipped_lines) == ds.skipped
    for ex in ds.examples:
        assert len(ex.ids) == len(ex.mask) and 2 <= len(ex.ids) <= max_seq_length
        assert any(ex.mask[1:]), "an example without a single target token"
    batch = make_batch(ds.examples[:4], max_seq_length)
    assert batch.n_target_tokens == sum(sum(ex.mask[1:]) for ex in ds.examples[:4])


@fuzz(40)
@given(
    pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=12),
    repeat=st.integers(1, 400),
    where=st.sampled_from(["instruction", "output", "system", "both"]),
)
def test_awkward_strings_in_every_field_of_a_conversation(tokenizer, files, pieces, repeat, where):
    """Quotes, backslashes, CR/LF, control/format/combining characters, template syntax and special
    token text, up to tens of thousands of characters, in the fields that reach the chat
    template."""
    s = "".join(pieces) * repeat
    rec = {"instruction": "问", "output": "答", "input": ""}
    if where == "both":
        rec.update(instruction=s, output=s)
    else:
        rec[where] = s
    path = files(
        _dump([rec, {"instruction": "你是谁？", "output": "我是甄嬛。"}], ".jsonl", False), ".jsonl"
    )
    try:
        ds = load_dataset(path, tokenizer, max_seq_length=512)
    except MlxLoraError as e:
        _one_line(e)
        return
    assert 1 <= len(ds.examples) <= 2
    assert all(len(ex.ids) <= 512 and any(ex.mask[1:]) for ex in ds.examples)


# ------------------------------------------------------------------------------- Modelfile values


@fuzz(300)
@given(
    value=st.one_of(
        st.text(),
        st.lists(st.sampled_from(PIECES), max_size=20).map("".join),
        LONG,
        st.text(max_size=10).map(lambda s: s + "\ud800"),
    )
)
def test_quote_value_quotes_exactly_or_refuses(value):
    """The Go-harness tests in test_ollama.py check what Ollama reads back; here: any Python string
    (lone surrogates, very long text) gives ``delim + value + delim`` or a one-line refusal."""
    from mlx_lora.ollama.modelfile import quote_value

    try:
        quoted = quote_value(value, "SYSTEM prompt")
    except MlxLoraError as e:
        _one_line(e)
        return
    assert quoted in (f'"{value}"', f'"""{value}"""')


@fuzz(150)
@given(
    gen=st.dictionaries(
        st.one_of(
            st.sampled_from(
                ["temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "eos_token_id"]
            ),
            KEY,
        ),
        JSON,
        max_size=5,
    ),
    stops=st.lists(AWKWARD, max_size=3),
    system=st.one_of(st.none(), AWKWARD),
    num_ctx=st.integers(-5, 1 << 20),
)
def test_modelfile_from_any_generation_config(gen, stops, system, num_ctx):
    """What export does with a model's generation_config.json (any JSON object) and its end
    tokens."""
    from mlx_lora.ollama.modelfile import generation_params, go_template_for, render_modelfile

    template = go_template_for(_CHATML, "<s>", "<|im_end|>", add_bos=False)
    try:
        text = render_modelfile(
            from_path="./m.gguf",
            template=template,
            system=system,
            stops=stops,
            num_ctx=num_ctx,
            params=generation_params(gen),
        )
    except MlxLoraError as e:
        _one_line(e)
        return
    assert (
        text.endswith("\n") and 'FROM "./m.gguf"' in text and f"PARAMETER num_ctx {num_ctx}" in text
    )


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
