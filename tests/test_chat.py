"""Chat: one prompt builder, mlx-lm generation, every end token, cache reuse that changes nothing.

The tiny random model alone just repeats its last input token, so the adapter used here has
random, fairly large lora_B matrices: its greedy answers vary with the context, which is what
makes "reuse equals fresh" and "chat equals mlx-lm" meaningful comparisons.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.infer.generate import (
    BadParameter,
    PromptCache,
    StopStrings,
    complete,
    generate_answer,
    resolve_sampling,
    stop_token_ids,
)
from mlx_lora.model import lora
from mlx_lora.model.load import load_base, load_for_inference
from mlx_lora.model.meta import generation_config
from mlx_lora.model.prompt import build_prompt, hf_tokenizer

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
STATS = re.compile(r"^\[\d+ tokens, [\d.]+ tokens/s; prompt \d+ tokens", re.M)
QUESTIONS = ["你是谁？", "Tell me about the palace garden.", "What did the emperor say today?"]


def make_adapter(
    model_dir: Path,
    out: Path,
    sigma: float = 0.5,
    seed: int = 0,
    system_prompt: str | None = SYSTEM,
) -> Path:
    """A PEFT adapter folder with random nonzero lora_B (a 'trained' adapter without training)."""
    model, _, _ = load_base(model_dir, dtype=mx.float32)
    lora.apply_lora(model, lora.DEFAULT_TARGETS, 8, 16.0)
    key = mx.random.key(seed)
    updates = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_B"):
            key, sub = mx.random.split(key)
            updates.append((name, sigma * mx.random.normal(value.shape, key=sub)))
    model.load_weights(updates, strict=False)
    extra = {"system_prompt": system_prompt} if system_prompt else {}
    cfg = lora.adapter_config(
        r=8,
        alpha=16.0,
        dropout=0.0,
        targets=lora.DEFAULT_TARGETS,
        base_model=str(model_dir),
        extra=extra,
    )
    lora.save_adapter(out, model, cfg)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("chat") / "adapter")


@pytest.fixture(scope="module")
def loaded(tiny_model, adapter):
    return load_for_inference(str(tiny_model), adapter)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _ids(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or (transformers 5) a BatchEncoding."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ------------------------------------------------------------------------- prompt builder


CONVERSATIONS = [
    user("你好"),
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a story.\nA short one."},
    ],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是甄嬛，家父是大理寺少卿甄远道。"},
        {"role": "user", "content": "皇上呢？"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_ids_equal_apply_chat_template(qwen_tokenizer, messages):
    want = _ids(
        qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    )
    assert build_prompt(qwen_tokenizer, messages) == want
    assert qwen_tokenizer.decode(want).endswith("<|im_start|>assistant\n")
    if messages[0]["role"] != "system":  # the adapter's system prompt goes first
        with_sys = [{"role": "system", "content": SYSTEM}, *messages]
        want = _ids(
            qwen_tokenizer.apply_chat_template(with_sys, add_generation_prompt=True, tokenize=True)
        )
        assert build_prompt(qwen_tokenizer, messages, SYSTEM) == want
        assert "You are a helpful assistant" not in qwen_tokenizer.decode(want)


def test_generation_uses_the_adapters_system_prompt(loaded):
    assert loaded.system_prompt == SYSTEM
    tok = loaded.tokenizer
    stream = generate_answer(loaded, user("hi"), max_tokens=1)
    assert stream.prompt_ids == build_prompt(tok, user("hi"), SYSTEM)
    stream = generate_answer(loaded, user("hi"), system_prompt="Be brief.", max_tokens=1)
    assert stream.prompt_ids == build_prompt(
        tok, [{"role": "system", "content": "Be brief."}, *user("hi")]
    )
    own = [{"role": "system", "content": "Own."}, *user("hi")]
    assert generate_answer(loaded, own, max_tokens=1).prompt_ids == build_prompt(tok, own)


def test_a_model_without_chat_template_is_a_user_error():
    stories = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stories260K"
    if not stories.is_dir():
        pytest.skip("../shared/fixtures/stories260K absent")
    with pytest.raises(MlxLoraError, match="has no chat template"):
        complete(load_for_inference(str(stories)), user("Once upon a time"))


# ------------------------------------------------------------------------- stop tokens, sampling


def test_stop_tokens_cover_every_end_token(tiny_qwen, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_qwen, model_dir)
    gc_path = model_dir / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    gc["eos_token_id"] = [151645, 151643, 42]  # an extra id only generation_config names
    gc_path.write_text(json.dumps(gc))
    loaded = load_for_inference(str(model_dir))
    ids = stop_token_ids(loaded)
    assert {151643, 151645, 42} <= ids
    assert {151643, 151645, 42} <= set(loaded.tokenizer.eos_token_ids)


def test_sampling_defaults_come_from_generation_config(tiny_model, tmp_path):
    s = resolve_sampling(generation_config(tiny_model))
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    s = resolve_sampling(
        generation_config(tiny_model),
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.2,
        seed=5,
    )
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed) == (0.0, 1.0, 0, 1.2, 5)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "temperature": 0.7})
    )
    assert resolve_sampling(generation_config(tmp_path)).temperature == 0.0
    assert resolve_sampling(generation_config(tmp_path / "absent")).temperature == 0.0
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}):
        with pytest.raises(BadParameter) as e:
            resolve_sampling(generation_config(tiny_model), **bad)
        assert e.value.param == next(iter(bad))


# ------------------------------------------------------------------------- generation


def test_greedy_equals_mlx_lm_generate(loaded):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    for q in QUESTIONS[:2]:
        ids = build_prompt(loaded.tokenizer, user(q), SYSTEM)
        ours = complete(loaded, user(q), temperature=0, repetition_penalty=1.0, max_tokens=32)
        ref = generate(
            loaded.model, loaded.tokenizer, prompt=ids, max_tokens=32, sampler=make_sampler(0.0)
        )
        assert ours.text == ref
        assert len(set(ours.tokens)) > 5  # a real, varied answer, not one repeated token
        # the generation_config default (repetition_penalty 1.05) is mlx-lm's logits processor
        ours = complete(loaded, user(q), temperature=0, max_tokens=32)
        ref = generate(
            loaded.model,
            loaded.tokenizer,
            prompt=ids,
            max_tokens=32,
            sampler=make_sampler(0.0),
            logits_processors=make_logits_processors(repetition_penalty=1.05),
        )
        assert ours.text == ref
        assert (ours.prompt_tokens, ours.completion_tokens, ours.finish_reason) == (
            len(ids),
            32,
            "length",
        )


def test_fused_folder_chats_like_base_plus_adapter(loaded, adapter, tmp_path):
    from mlx_lora.export.fuse import fuse

    fused = load_for_inference(str(fuse(None, adapter, tmp_path / "fused", dtype="float32")))
    assert fused.system_prompt == SYSTEM  # recorded by fuse, used by chat like the adapter's
    a = complete(loaded, user(QUESTIONS[0]), temperature=0, max_tokens=24)
    b = complete(fused, user(QUESTIONS[0]), temperature=0, max_tokens=24)
    assert a.tokens == b.tokens and a.prompt_tokens == b.prompt_tokens


def test_seeded_sampling_is_reproducible(loaded):
    a = complete(loaded, user(QUESTIONS[0]), temperature=0.9, seed=11, max_tokens=24)
    b = complete(loaded, user(QUESTIONS[0]), temperature=0.9, seed=11, max_tokens=24)
    c = complete(loaded, user(QUESTIONS[0]), temperature=0.9, seed=12, max_tokens=24)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


@pytest.mark.parametrize(
    "temperature,seed,penalty", [(0.0, None, None), (0.8, 3, None), (0.0, None, 3.0)]
)
def test_cache_reuse_changes_no_token(loaded, temperature, seed, penalty):
    """Three turns (plus an edited last turn) with one reused cache ≡ a fresh cache every time.

    A strong repetition penalty over mlx-lm's 20-token window checks that the penalty still sees
    the cached prompt tokens when only a short suffix is computed.
    """
    kw = {"temperature": temperature, "seed": seed, "repetition_penalty": penalty, "max_tokens": 20}
    cache = PromptCache(loaded.model)
    messages: list[dict] = []
    previous_prompt = 0
    for turn, q in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": q})
        reused = complete(loaded, messages, cache=cache, **kw)
        fresh = complete(loaded, messages, **kw)
        assert reused.tokens == fresh.tokens
        assert reused.text == fresh.text
        if turn:  # the whole previous prompt (and usually part of the answer) came from the cache
            assert reused.cached_tokens >= previous_prompt - 1
        previous_prompt = reused.prompt_tokens
        messages.append({"role": "assistant", "content": reused.text})
    # ask the same again (a retry): all but the last prompt token come from the cache
    messages.pop()
    again = complete(loaded, messages, cache=cache, **kw)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.tokens == fresh.tokens
    messages.append({"role": "assistant", "content": again.text})
    # regenerate with another last question: the cache is trimmed back to the shared prefix
    messages[-2] = {"role": "user", "content": "Something else entirely?"}
    messages.pop()
    reused = complete(loaded, messages, cache=cache, **kw)
    fresh = complete(loaded, messages, **kw)
    assert reused.tokens == fresh.tokens
    assert 0 < reused.cached_tokens < previous_prompt


def test_stop_strings_cut_the_text(loaded):
    full = complete(loaded, user(QUESTIONS[1]), temperature=0, max_tokens=32)
    stop = full.text[6:9]
    assert stop and stop.strip()
    stream = generate_answer(
        loaded, user(QUESTIONS[1]), temperature=0, max_tokens=32, stop=["@@never@@", stop]
    )
    pieces = list(stream)
    want = full.text[: full.text.find(stop)]
    assert "".join(pieces) == stream.answer.text == want
    assert stream.answer.finish_reason == "stop"
    assert full.tokens[: stream.answer.completion_tokens] == stream.answer.tokens


@given(
    st.text("ab<|>", max_size=30),
    st.lists(st.integers(1, 5), max_size=30),
    st.lists(st.text("ab<|>", min_size=1, max_size=4), max_size=3),
)
def test_stop_strings_on_any_split(text, cuts, stops):
    """Streamed in any pieces, the shown text is the text up to the first stop string found."""
    chunks, i = [], 0
    for c in cuts:
        chunks.append(text[i : i + c])
        i += c
    chunks.append(text[i:])
    cutter, shown, stopped, seen = StopStrings(stops), "", False, ""
    want, want_stop = text, False
    for chunk in chunks:
        seen += chunk
        found = [seen.find(x) for x in stops if x in seen]
        if found:
            want, want_stop = seen[: min(found)], True
            break
    for n, chunk in enumerate(chunks):
        piece, stopped = cutter.feed(chunk, final=n == len(chunks) - 1)
        shown += piece
        assert not any(x in shown for x in stops)
        if stopped:
            break
    assert (shown, stopped) == (want, want_stop)


# ------------------------------------------------------------------------- end tokens


@pytest.fixture(scope="module")
def llama_loaded(tmp_path_factory):
    """Llama-architecture tiny model (its lm_head is separate from the embedding, so one output row
    can be edited without changing how the prompt is read), with an extra generation_config eos."""
    from conftest import make_tiny_model

    d = make_tiny_model(tmp_path_factory.mktemp("llama") / "tiny-llama", arch="llama")
    gc = json.loads((d / "generation_config.json").read_text())
    gc["eos_token_id"] = [*gc["eos_token_id"], 700]
    (d / "generation_config.json").write_text(json.dumps(gc))
    return load_for_inference(str(d))


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>", 700])
def test_generation_stops_at_each_end_token(llama_loaded, end):
    """Edit lm_head so the model's greedy choice after exactly 3 answer tokens is the end token."""
    loaded, k = llama_loaded, 3
    end_id = (
        end if isinstance(end, int) else hf_tokenizer(loaded.tokenizer).convert_tokens_to_ids(end)
    )
    msgs = user(f"Please answer with {end}")
    first = complete(loaded, msgs, temperature=0, repetition_penalty=1.0, max_tokens=k)
    assert first.finish_reason == "length" and end_id not in first.tokens
    ids = generate_answer(loaded, msgs, max_tokens=1).prompt_ids
    hidden = loaded.model.model(mx.array(ids + first.tokens)[None])[0]  # final-norm states
    h = np.array(hidden[len(ids) - 1 :].astype(mx.float32))  # the k + 1 states that pick the answer
    target = np.array([-30.0] * k + [30.0])  # low while answering, top choice after k tokens
    row = np.linalg.lstsq(h, target, rcond=None)[0]
    head = loaded.model.lm_head
    original = head.weight
    w = np.array(original.astype(mx.float32))
    w[end_id] = row
    head.weight = mx.array(w).astype(original.dtype)
    try:
        out = complete(loaded, msgs, temperature=0, repetition_penalty=1.0, max_tokens=50)
    finally:
        head.weight = original
    assert out.tokens == [*first.tokens, end_id]  # the model emitted it, and generation stopped
    assert out.finish_reason == "stop"
    assert out.text == first.text
    assert "<|im_end|>" not in out.text and "<|endoftext|>" not in out.text


# ------------------------------------------------------------------------- CLI


def _chat(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora.chat", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=180,
        cwd=REPO,
        **kw,
    )


def test_cli_one_shot_is_reproducible_and_equals_mlx_lm(tiny_model, adapter, loaded):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    args = [
        "--model",
        str(tiny_model),
        "--adapter",
        str(adapter),
        "--prompt",
        QUESTIONS[0],
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ]
    a, b = _chat(*args), _chat(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    ids = build_prompt(loaded.tokenizer, user(QUESTIONS[0]), SYSTEM)
    ref = generate(
        loaded.model,
        loaded.tokenizer,
        prompt=ids,
        max_tokens=24,
        sampler=make_sampler(0.0),
        logits_processors=make_logits_processors(repetition_penalty=1.05),
    )
    assert a.stdout == ref + "\n"
    assert "tokens/s" in a.stderr


def test_cli_bad_adapter_is_one_line_exit_2():
    r = _chat("--adapter", "/nonexistent", "--prompt", "hi")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --adapter /nonexistent")


def test_cli_interactive_commands(tiny_model, adapter, loaded):
    script = "Hello\n/system Be brief.\nHi\n/reset\nHello\n/quit\n"
    r = _chat(
        "--model",
        str(tiny_model),
        "--adapter",
        str(adapter),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        input=script,
    )
    assert r.returncode == 0, r.stderr
    a1 = complete(loaded, user("Hello"), temperature=0, max_tokens=12).text
    a2 = complete(loaded, user("Hi"), system_prompt="Be brief.", temperature=0, max_tokens=12).text
    a3 = complete(
        loaded, user("Hello"), system_prompt="Be brief.", temperature=0, max_tokens=12
    ).text
    assert r.stdout == f">>> {a1}\n>>> >>> {a2}\n>>> >>> {a3}\n>>> "
    assert len(STATS.findall(r.stderr)) == 3


def test_cli_ctrl_c_stops_the_answer_not_the_program(tiny_model, adapter):
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lora.chat",
            "--model",
            str(tiny_model),
            "--adapter",
            str(adapter),
            "--max-tokens",
            "1000000",
            "--seed",
            "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        os.set_blocking(p.stdout.fileno(), False)
        out = b""
        for question in (b"Hello\n", b"Again\n"):
            p.stdin.write(question)
            p.stdin.flush()
            start, seen = time.time(), len(out)
            while len(out) < seen + 40 and time.time() - start < 60:  # the answer is streaming
                out += p.stdout.read() or b""
                time.sleep(0.05)
            assert len(out) >= seen + 40, "no streamed answer"
            p.send_signal(signal.SIGINT)
            time.sleep(0.5)
        assert p.poll() is None  # still running after two Ctrl-C
        p.stdin.write(b"/quit\n")
        p.stdin.flush()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert err.decode().count("(stopped)") == 2
    assert len(STATS.findall(err.decode())) == 2


def test_bench_script_runs(tiny_model):
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_generate.py"),
            "--model",
            str(tiny_model),
            "--max-tokens",
            "8",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"ratio chat / mlx_lm: \d+\.\d+", r.stdout)
    assert "time to first token" in r.stdout
