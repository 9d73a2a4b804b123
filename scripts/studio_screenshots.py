"""Screenshots of the studio's four tabs for the README, taken in the system's headless Chromium.

    python scripts/studio_screenshots.py [--out docs/studio] [--lang zh|en]

Builds a tiny model and two short runs in a temporary folder, starts ``python -m mlx_lora.studio``
on it, and drives the page with Selenium: data preview, live training, two runs overlaid, a chat
side by side with the base model, an export with its verify report. Needs ``chromium`` and
``chromium-driver`` (Debian), a CJK font for the Chinese page (``fonts-wqy-microhei``) and
``pip install selenium``; nothing is downloaded.

The helpers (browser launch, studio start, waiting) are shared with tests/test_studio_browser.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_lora.data.dataset import read_records
from mlx_lora.testing import SAMPLE_DATA
from mlx_lora.testing.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
# Quiet and offline: without the background-networking flags Chromium keeps calling home.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) from the system, or None."""
    browser = next((p for p in CHROMIUM if Path(p).is_file()), None)
    driver = next((p for p in CHROMEDRIVER if Path(p).is_file()), None) or shutil.which(
        "chromedriver"
    )
    return (browser, driver) if browser and driver else None


def launch_browser(width: int = 1360, height: int = 1000, lang: str = "en") -> Any:
    """Headless system Chromium under Selenium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='studio-chromium-')}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.add_argument(f"--lang={'zh-CN' if lang == 'zh' else 'en-US'}")
    # The test session preloads OpenBLAS (LD_PRELOAD) for MLX; Chromium crashes with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return webdriver.Chrome(service=Service(paths[1], env=env), options=opts)


def prepare_root(root: Path) -> Path:
    """A studio folder: models/tiny (fan-in init: learns fast), data/{huanhuan,identity}.json."""
    make_tiny_model(root / "models" / "tiny", init="fan_in")
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLE_DATA, root / "data" / "huanhuan.json")
    records = read_records(SAMPLE_DATA)
    identity = [r for r in records if r.get("instruction") == "你是谁？"]
    (root / "data" / "identity.json").write_text(
        json.dumps(identity, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    return root


def start_studio(root: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """``python -m mlx_lora.studio --root ROOT --port 0``; returns the process and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora.studio", "--root", str(root), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=open(root / "studio.log", "wb"),  # noqa: SIM115 - lives as long as the studio
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.search(r"http://\S+?/", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"the studio did not start: {line!r}; see {root / 'studio.log'}")
    return proc, m.group(0)


def stop_studio(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user would; running jobs checkpoint and end."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - element not there yet, stale, ...
            value = None
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Page:
    """Small Selenium vocabulary for the studio page."""

    def __init__(self, driver: Any, url: str):
        self.d, self.url = driver, url

    def open(self, tab: str = "train") -> None:
        self.d.get(f"{self.url}#{tab}")
        wait_for("the page", lambda: self.d.find_element("css selector", "body[data-ready='1']"))

    def el(self, id_: str) -> Any:
        return self.d.find_element("id", id_)

    def tab(self, name: str) -> None:
        self.el(f"tab-btn-{name}").click()
        wait_for(f"tab {name}", lambda: self.el(f"tab-{name}").is_displayed())

    def fill(self, id_: str, value: Any) -> None:
        e = self.el(id_)
        if e.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(e).select_by_value(str(value))
            return
        e.clear()
        e.send_keys(str(value))

    def check(self, id_: str, on: bool = True) -> None:
        e = self.el(id_)
        if e.is_selected() != on:
            e.click()

    def click(self, id_: str) -> None:
        wait_for(f"#{id_} enabled", lambda: self.el(id_).is_enabled())
        self.el(id_).click()

    def start(self, button: str, status: str = "t-status") -> None:
        """Click a button that starts a job; the status of an earlier job no longer counts."""
        self.d.execute_script(f"document.getElementById('{status}').dataset.status = ''")
        self.click(button)

    def attr(self, id_: str, name: str) -> str:
        return self.el(id_).get_attribute(name) or ""

    def text(self, id_: str) -> str:
        """The element's text, also when its tab is hidden."""
        return self.el(id_).get_attribute("textContent") or ""

    def banner(self) -> str:
        return self.el("banner-text").text if self.el("banner").is_displayed() else ""

    def status(self, id_: str, *wanted: str, timeout: float = 120) -> str:
        def done() -> str | None:
            s = self.attr(id_, "data-status")
            if s == "failed" and "failed" not in wanted:
                raise AssertionError(f"job failed: {self.text(id_)} / {self.banner()}")
            return s if s in wanted else None

        return wait_for(f"#{id_} status {wanted}", done, timeout)

    def alive(self, id_: str = "t-status") -> bool:
        """True unless the job shown in ``id_`` failed (then the wait stops with its message)."""
        if self.attr(id_, "data-status") == "failed":
            raise AssertionError(f"job failed: {self.text(id_)}")
        return True

    def points(self, chart: str = "loss") -> int:
        return int(self.attr(f"chart-{chart}", "data-points") or 0)

    def train_form(self, output_dir: str, steps: int, data: str = "data/identity.json") -> None:
        """Settings under which the tiny model learns its identity line within ~150 steps."""
        values = {
            "t-model": "models/tiny",
            "t-data": data,
            "t-output": output_dir,
            "t-max_steps": steps,
            "t-per_device_train_batch_size": 1,
            "t-gradient_accumulation_steps": 4,
            "t-learning_rate": 3e-3,
            "t-logging_steps": 5,
            "t-save_steps": 50,
            "t-val_split": 0.25,
            "t-eval_steps": 25,
            "t-max_seq_length": 256,
            "t-lora_r": 16,
            "t-lora_dropout": 0,
            "t-seed": 0,
        }
        for k, v in values.items():
            self.fill(k, v)
        self.check("t-gc", False)
        self.fill("t-system", "现在你要扮演皇帝身边的女人--甄嬛")

    def shot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.d.execute_script("window.scrollTo(0, 0)")
        self.d.save_screenshot(str(path))
        print(f"wrote {path}")


def screenshots(out: Path, lang: str) -> None:
    """Two runs, a chat and an export on a tiny model; one PNG per tab."""
    work = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    root = prepare_root(work / "root")
    proc, url = start_studio(root)
    try:
        driver = launch_browser(lang=lang)
    except BaseException:
        stop_studio(proc)
        raise
    try:
        p = Page(driver, url)
        p.open("train")
        if (p.attr("lang", "textContent") == "中文") == (lang == "zh"):
            p.click("lang")
        for name, steps, lr in (
            ("runs/huanhuan-lr1e-3", 150, 1e-3),
            ("runs/huanhuan-lr3e-3", 150, 3e-3),
        ):
            p.tab("train")
            p.train_form(name, steps)
            p.fill("t-learning_rate", lr)
            p.start("t-start")
            p.status("t-status", "finished", timeout=300)
        p.click("t-preview")
        wait_for("preview", lambda: p.d.find_elements("css selector", "#preview .trained"))
        p.shot(out / f"studio-train-{lang}.png")

        p.tab("watch")
        for box in p.d.find_elements("css selector", "#run-list input[type=checkbox]"):
            if not box.is_selected():
                box.click()
        wait_for("two curves", lambda: p.points() >= 60)
        time.sleep(0.5)
        p.shot(out / f"studio-watch-{lang}.png")

        p.tab("chat")
        p.fill("c-adapter", "runs/huanhuan-lr3e-3")
        p.fill("c-max", 32)
        p.check("c-compare", True)
        p.fill("c-input", "你是谁？")
        p.click("c-send")
        wait_for(
            "two answers",
            lambda: len(p.d.find_elements("css selector", ".msg[data-done='1']")) >= 2,
            120,
        )
        p.shot(out / f"studio-chat-{lang}.png")

        p.tab("export")
        p.fill("e-adapter", "runs/huanhuan-lr3e-3")
        p.fill("e-name", "huanhuan-tiny")
        p.fill("e-type", "f32")
        p.start("e-start", "e-status")
        p.status("e-status", "finished", timeout=300)
        wait_for("verify badge", lambda: p.attr("e-verify-badge", "data-ok"), 30)
        p.shot(out / f"studio-export-{lang}.png")
    finally:
        driver.quit()
        stop_studio(proc)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "studio"), help="folder for the PNGs")
    ap.add_argument("--lang", choices=["zh", "en"], default="zh", help="language of the page")
    args = ap.parse_args()
    screenshots(Path(args.out), args.lang)


if __name__ == "__main__":
    main()
