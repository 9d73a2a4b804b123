"""The studio in a real browser: headless system Chromium driven by Selenium.

One walk through the page on a tiny model, the way a user clicks: preview the data, start a run,
watch the curve grow, stop it (checkpoint), resume it to the end, chat (the greedy answer must be
``python -m mlx_lora.chat``'s, token for token), export with verify and read the Modelfile and the
``ollama create`` command. Skips without chromium + chromedriver + selenium, unless
MLX_LORA_REQUIRE_BROWSER=1 (CI sets it, so a missing browser fails there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, load_script

from mlx_lora.testing.adapter import random_adapter
from mlx_lora.testing.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow

shots = load_script("studio_screenshots")
QUESTION = "你是谁？"
STEPS = 200  # about 12 s on 2 idle cores: long enough to stop in the middle


def _need_browser() -> None:
    missing = []
    if shots.browser_paths() is None:
        missing.append("chromium + chromium-driver (apt)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        msg = f"the browser test needs {', '.join(missing)}"
        if os.environ.get("MLX_LORA_REQUIRE_BROWSER"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture()
def studio(tmp_path):
    _need_browser()
    root = shots.prepare_root(tmp_path / "root")
    proc, url = shots.start_studio(root)
    driver = None
    try:
        driver = shots.launch_browser()
        yield shots.Page(driver, url), root
    finally:
        if driver is not None:
            driver.quit()
        shots.stop_studio(proc)
        log = (root / "studio.log").read_text(encoding="utf-8", errors="replace")
        sys.stderr.write(log[-4000:])


def cli_answer(root: Path, adapter: Path, max_tokens: int, flag: str = "--adapter") -> str:
    """What ``python -m mlx_lora.chat --prompt`` prints for the same question, greedy
    (``flag="--model"``: of a model alone)."""
    done = subprocess.run(
        [sys.executable, "-m", "mlx_lora.chat", flag, str(adapter), "--prompt", QUESTION,
         "--temperature", "0", "--max-tokens", str(max_tokens)],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_train_watch_chat_export_in_the_browser(studio):
    p, root = studio
    p.open("train")

    # A path outside --root is refused on the page; the studio keeps serving.
    p.fill("t-model", "models/tiny")
    p.fill("t-data", "../../../etc/passwd")
    p.click("t-preview")
    assert "outside" in shots.wait_for("banner", p.banner, 20)

    # Preview: the chat template's rendering, the answer highlighted as trained.
    p.train_form("runs/a", steps=STEPS)
    p.click("t-preview")
    trained = shots.wait_for(
        "preview", lambda: p.d.find_elements("css selector", "#preview .trained"), 60
    )
    assert "我是甄嬛" in trained[0].text and "<|im_end|>" in trained[0].text
    assert "<|im_start|>assistant" in p.text("preview")

    # Start; the curve grows while the run is live.
    p.start("t-start")
    p.status("t-status", "running")
    p.tab("watch")
    first = shots.wait_for("a few points", lambda: p.alive() and p.points() >= 3 and p.points(), 90)
    shots.wait_for("the curve to grow", lambda: p.alive() and p.points() > first, 30)

    # Stop = Ctrl-C: a checkpoint is written, the run says how to continue.
    p.click("w-stop")
    p.status("t-status", "stopped")
    ckpts = sorted((root / "runs" / "a").glob("checkpoint-*"))
    assert ckpts, "stop must leave a checkpoint"
    assert "resume" in p.text("t-status").lower()
    stopped_at = int(p.attr("chart-loss", "data-max-step"))
    assert 0 < stopped_at < STEPS

    # Resume from the Train tab: the run continues to the last step.
    p.tab("train")
    p.start("t-resume")
    p.status("t-status", "finished", timeout=180)
    p.tab("watch")
    shots.wait_for(
        "the resumed curve", lambda: p.attr("chart-loss", "data-max-step") == str(STEPS), 30
    )
    assert p.points("eval") >= 2
    assert "resuming from" in p.text("w-log")
    assert (root / "runs" / "a" / "adapter_model.safetensors").is_file()

    # Chat: greedy on the page = greedy from the command line; the base answers beside it.
    p.tab("chat")
    p.fill("c-adapter", "runs/a")
    p.fill("c-temp", 0)
    p.fill("c-max", 24)
    p.check("c-compare", True)
    p.fill("c-input", QUESTION)
    p.click("c-send")
    shots.wait_for(
        "two answers",
        lambda: len(p.d.find_elements("css selector", ".msg[data-done='1']")) == 2,
        120,
    )
    main = p.d.find_element("css selector", "#c-main .msg.assistant .text").text
    base = p.d.find_element("css selector", "#c-base .msg.assistant .text").text
    assert main.strip() == cli_answer(root, root / "runs" / "a", 24)
    assert main.strip() == "我是甄嬛，家父是大理寺少卿甄远道。"  # the run really trained
    assert main != base

    # Export with verify: the report passes, the Modelfile and the ollama command are shown.
    p.tab("export")
    p.fill("e-adapter", "runs/a")
    p.fill("e-name", "tiny-hh")
    p.fill("e-type", "f32")
    p.check("e-verify", True)
    p.start("e-start", "e-status")
    p.status("e-status", "finished", timeout=180)
    assert shots.wait_for("verify badge", lambda: p.attr("e-verify-badge", "data-ok"), 30) == "1"
    assert "all checks passed" in p.text("e-verify-report")
    assert 'FROM "./tiny-hh.gguf"' in p.text("e-modelfile")
    cmd = p.attr("e-cmd", "value")
    assert cmd.startswith("ollama create tiny-hh -f ") and cmd.endswith("Modelfile")
    assert (root / "export" / "tiny-hh.gguf").is_file()

    # 中文: the language switch relabels the page (it opened in English: --lang=en-US).
    assert p.text("tab-btn-train") == "Train"
    p.click("lang")
    assert (p.text("tab-btn-train"), p.text("tab-btn-export")) == ("训练", "导出")
    assert p.text("e-verify-badge") == "校验通过"


def test_compare_runs_in_the_browser(studio):
    """Compare mode: two runs of one base and the base answer side by side, each as the command
    line answers with it alone; a run of another base is refused on the page."""
    p, root = studio
    tiny = root / "models" / "tiny"
    random_adapter(tiny, root / "runs" / "a", seed=1, scale=0.5)
    random_adapter(tiny, root / "runs" / "b", seed=2, scale=0.5, targets=("q_proj", "v_proj"))
    other = make_tiny_model(root / "models" / "other", hidden_size=32, seed=3)
    random_adapter(other, root / "runs" / "other", seed=4)
    p.open("chat")

    def tick(run: str, on: bool = True) -> None:
        box = shots.wait_for(
            run, lambda: p.d.find_element("css selector", f"#c-runs-list input[value='{run}']"), 30
        )
        if box.is_selected() != on:
            box.click()

    p.check("c-runs-mode", True)
    assert p.el("c-runs").is_displayed() and not p.el("c-main").is_displayed()
    tick("runs/a")
    tick("runs/b")
    p.check("c-compare", True)
    p.fill("c-temp", 0)
    p.fill("c-max", 16)
    p.fill("c-input", QUESTION)
    p.click("c-send")
    shots.wait_for(
        "three answers",
        lambda: len(p.d.find_elements("css selector", "#c-cmp .msg[data-done='1']")) == 3,
        120,
    )
    texts = [
        p.d.find_element("css selector", f"#c-col-{i} .msg.assistant .text")
        .get_attribute("textContent")
        .strip()
        for i in range(3)
    ]
    assert texts[0] == cli_answer(root, root / "runs" / "a", 16)
    assert texts[1] == cli_answer(root, root / "runs" / "b", 16)
    assert texts[2] == cli_answer(root, tiny, 16, "--model")
    assert len(set(texts)) == 3, texts

    # a run of another base: one line on the page, nothing answered
    tick("runs/b", False)
    tick("runs/other")
    p.fill("c-input", QUESTION)
    p.click("c-send")
    assert "different bases" in shots.wait_for("banner", p.banner, 30)
    assert not p.d.find_elements("css selector", "#c-cmp .msg")
