"""Crash safety of ``python -m mlx_lora.train``: SIGKILL at random moments, and Ctrl-C.

A laptop that sleeps, runs out of memory or is closed kills training at an arbitrary instruction.
Here the real command is killed with SIGKILL ten times at seeded random moments (some exactly while
a checkpoint is being written, found by watching for the ``.checkpoint-N.tmp-*`` folder), and run
again with ``--resume`` each time (a fresh start when no complete checkpoint exists yet) until it
finishes. After every kill each ``checkpoint-N`` folder must be complete and loadable (checkpoints
appear by an atomic rename, so a partial one is never visible under its final name), every resume
must start from the newest complete checkpoint, and the final adapter must equal an uninterrupted
run's. Ctrl-C must save a checkpoint, say where in one line, exit 130, and resume to the same end.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import REPO, SAMPLE_DATA

pytestmark = pytest.mark.slow

STEPS = 40
SEED = 20240611
ARGS = [
    "--data",
    str(SAMPLE_DATA),
    "--max-steps",
    str(STEPS),
    "--save-steps",
    "2",
    "--logging-steps",
    "1",
    "--per-device-train-batch-size",
    "2",
    "--gradient-accumulation-steps",
    "1",
    "--lora-dropout",
    "0.1",
    "--learning-rate",
    "1e-3",
    "--lr-scheduler-type",
    "cosine",
    "--warmup-steps",
    "3",
    "--max-seq-length",
    "128",
    "--no-plot",
]


class Run:
    """One ``python -m mlx_lora.train`` process with its output in files (nothing to deadlock
    on)."""

    def __init__(self, model: Path, out: Path, logs: Path, resume: bool):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        cmd = [
            sys.executable,
            "-m",
            "mlx_lora.train",
            "--model",
            str(model),
            "--output-dir",
            str(out),
            *ARGS,
        ]
        if resume:
            cmd.append("--resume")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a SIGKILL must not eat buffered lines
        with open(self.stdout_path, "wb") as o, open(self.stderr_path, "wb") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=REPO, env=env)
        self.started = time.monotonic()

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def training(self) -> bool:
        """The loop has started: the summary's last line is printed right before it."""
        return "schedule: " in self.stdout()

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> bool:
        """SIGKILL now; False when the process had already exited."""
        if not self.alive():
            return False
        self.proc.send_signal(signal.SIGKILL)
        return True


def complete_checkpoints(out: Path) -> dict[int, Path]:
    """``checkpoint-N`` folders, each checked to be complete and loadable (a partial one fails
    here)."""
    found = {}
    for d in out.glob("checkpoint-*"):
        step = int(d.name.removeprefix("checkpoint-"))
        names = sorted(p.name for p in d.iterdir())
        assert names == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ], f"partial checkpoint visible: {d} holds {names}"
        adapter = mx.load(str(d / "adapter_model.safetensors"))
        assert adapter and all(mx.isfinite(v).all().item() for v in adapter.values())
        assert mx.load(str(d / "optimizer.safetensors"))
        assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORA"
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["global_step"] == step
        assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, step + 1))
        found[step] = d
    return found


def temp_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".checkpoint-*")) if out.is_dir() else []


def adapter(out: Path) -> dict[str, mx.array]:
    return mx.load(str(out / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run, by the same command line."""
    out = tmp_path_factory.mktemp("crash") / "reference"
    r = Run(tiny_model, out, out.parent / "reference-logs", resume=False)
    assert r.wait() == 0, r.stderr()[-3000:]
    return out


def _kill_during_write(run: Run, out: Path, nth: int, deadline: float) -> bool:
    """Watch the output folder and SIGKILL as soon as the ``nth`` checkpoint temp folder appears."""
    seen: set[str] = set()
    while run.alive() and time.monotonic() < deadline:
        try:
            names = [
                e.name
                for e in os.scandir(out)
                if e.name.startswith(".checkpoint-") and ".tmp-" in e.name
            ]
        except FileNotFoundError:
            names = []
        seen.update(names)
        if len(seen) >= nth and names:
            return run.kill()
        time.sleep(0.0002)
    return run.kill()


def _kill_after(run: Run, delay: float, deadline: float, *, once_training: bool) -> bool:
    while once_training and run.alive() and not run.training() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    return run.kill()


def test_sigkill_at_random_moments_then_resume(tiny_model, reference, tmp_path):
    rng = random.Random(SEED)
    plan = ["write"] * 4 + ["training"] * 4 + ["startup"] * 2
    rng.shuffle(plan)
    ref = adapter(reference)
    ref_losses = losses(reference)
    chain, out = 0, tmp_path / "run-0"
    log: list[str] = []
    kills = mid_write = launches = finished_chains = 0
    t0 = time.monotonic()
    while True:
        assert launches < 40, f"too many launches: {log}"
        ckpts = complete_checkpoints(out) if out.is_dir() else {}
        stale = set(temp_dirs(out))  # left by an earlier kill; the next start removes them
        resume = bool(ckpts)
        expected = max(ckpts) if ckpts else None
        run = Run(tiny_model, out, tmp_path / "logs" / str(launches), resume)
        launches += 1
        mode = plan[kills] if kills < len(plan) else None
        deadline = time.monotonic() + 60
        if mode == "write":
            killed = _kill_during_write(run, out, rng.randint(1, 4), deadline)
        elif mode == "training":
            killed = _kill_after(run, rng.uniform(0.0, 0.5), deadline, once_training=True)
        elif mode == "startup":
            killed = _kill_after(run, rng.uniform(0.1, 1.2), deadline, once_training=False)
        else:
            killed = False
        code = run.wait()
        said = re.findall(r"resuming from (\S+) \(step (\d+)\)", run.stdout())
        if said:  # the resume point is the newest complete checkpoint, never a temp folder
            assert resume and said == [(str(ckpts[expected]), str(expected))], (said, expected)
        if (
            killed and code == -signal.SIGKILL
        ):  # (a run that finished just before the signal counts as finished)
            kills += 1
            left = sorted(set(temp_dirs(out)) - stale)
            mid_write += bool(left)
            after = (
                complete_checkpoints(out) if out.is_dir() else {}
            )  # every visible checkpoint is complete
            log.append(
                f"{mode}: killed at checkpoint {max(after) if after else None}, temp folders {left}"
            )
            continue
        assert code == 0, run.stderr()[-3000:]
        assert "Traceback" not in run.stderr()
        if resume:
            assert said, "a resumed run must say where it resumed from"
        # finished: the same adapter and the same per-step losses as the uninterrupted run
        assert max_diff(ref, adapter(out)) <= 1e-5
        got = losses(out)
        assert [s for s, _ in got] == list(range(1, STEPS + 1))
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, ref_losses, strict=True)) <= 1e-5
        assert temp_dirs(out) == [] and not list(out.glob(".*tmp*"))
        finished_chains += 1
        log.append(f"chain {chain} finished after {launches} launches")
        if kills >= len(plan):
            break
        chain += 1
        out = tmp_path / f"run-{chain}"
    elapsed = time.monotonic() - t0
    print(
        f"\n{kills} SIGKILLs ({mid_write} left a checkpoint half-written), {launches} launches, "
        f"{finished_chains} finished run(s) equal to the uninterrupted one, {elapsed:.1f} s"
    )
    print("\n".join(log))
    assert kills == len(plan)
    assert mid_write >= 1, f"no kill landed during a checkpoint write: {log}"


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same(tiny_model, reference, tmp_path):
    out = tmp_path / "run"
    run = Run(tiny_model, out, tmp_path / "logs-1", resume=False)
    deadline = time.monotonic() + 60
    while run.alive() and not (out / "checkpoint-2").is_dir() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert run.alive(), "the run ended before it could be interrupted"
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == 130
    err = run.stderr()
    assert "Traceback" not in err and err.count("interrupted") == 1
    last = err.rstrip("\n").split("\n")[-1]
    m = re.fullmatch(r"interrupted: saved (\S+/checkpoint-(\d+)); continue with --resume", last)
    assert m, last
    saved, step = Path(m.group(1)), int(m.group(2))
    assert saved == out / f"checkpoint-{step}" and 2 <= step < STEPS
    assert complete_checkpoints(out)[step] == saved and max(complete_checkpoints(out)) == step
    assert not (out / "adapter_model.safetensors").exists() and temp_dirs(out) == []

    resumed = Run(tiny_model, out, tmp_path / "logs-2", resume=True)
    assert resumed.wait() == 0, resumed.stderr()[-3000:]
    assert f"resuming from {saved} (step {step})" in resumed.stdout()
    assert max_diff(adapter(reference), adapter(out)) <= 1e-5
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
