"""Training and export runs as child processes of the studio.

A run is the ordinary command (``python -m mlx_lora.train …`` / ``python -m mlx_lora.export …``)
in its own process and session: the page stays responsive, a crash of the run (even a segfault or
SIGKILL) ends only that process, and Ctrl-C in the studio's terminal does not reach it. Its output
is read as it comes and turned into events (:mod:`mlx_lora.studio.events`). Stop = SIGINT, exactly
a Ctrl-C: train finishes the step, writes a checkpoint and exits 130.
"""

from __future__ import annotations

import codecs
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.studio.events import LineReader
from mlx_lora.train.checkpoint import checkpoints
from mlx_lora.train.report import EVENTS_ENV, log_line

MAX_LINES = 3000


class Busy(MlxLoraError):
    """A second run into a folder that a running job is writing."""


class Job:
    """One child process and everything the page shows about it."""

    def __init__(
        self,
        jid: str,
        kind: str,
        module: str,
        flags: list[str],
        output_dir: Path,
        cwd: Path,
        shown: str = "",
    ):
        self.id, self.kind, self.output_dir = jid, kind, output_dir
        self.module, self.flags = module, flags
        self.shown = shown or str(output_dir)  # the folder as the page names it
        self.argv = [sys.executable, "-m", module, *flags]
        self.cwd = cwd
        self.status = "starting"
        self.exit_code: int | None = None
        self.message: str | None = None
        self.progress: dict[str, Any] = {}
        self.history: list[dict] = []
        self.lines: list[str] = []
        self.dropped = 0  # lines dropped from the front (MAX_LINES)
        self.started = time.time()
        self.ended: float | None = None
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()

    @property
    def command(self) -> str:
        import shlex

        return shlex.join(["python", *self.argv[1:]])

    @property
    def running(self) -> bool:
        return self.status in ("starting", "running", "stopping")

    def start(self, log: Callable[[str], None]) -> None:
        env = dict(os.environ)
        env.update(
            {"PYTHONUNBUFFERED": "1", EVENTS_ENV: "jsonl", "TRANSFORMERS_VERBOSITY": "error"}
        )
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the studio's terminal is not the run's
            )
        except OSError as e:
            raise MlxLoraError(f"cannot start {self.command}: {e}") from None
        self.status = "running"
        log(f"[{self.id}] started (pid {self.proc.pid}): {self.command}")
        threading.Thread(target=self._read, args=(log,), daemon=True, name=self.id).start()

    def _read(self, log: Callable[[str], None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reader = LineReader()
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            text = decoder.decode(chunk, final=not chunk)
            for event in reader.feed(text, final=not chunk):
                self._apply(event, log)
            if not chunk:
                break
        code = self.proc.wait()
        self._finish(code, log)

    def _apply(self, event: dict, log: Callable[[str], None]) -> None:
        kind = event.get("event")
        with self.lock:
            fields = {k: v for k, v in event.items() if k != "event"}
            if kind == "text":
                for line in str(event.get("text", "")).split("\n"):
                    self._line(line, log)
            elif kind in ("step", "start"):
                self.progress.update(fields)
                if kind == "start" and fields.get("resumed_from"):  # as the console says it
                    msg = f"resuming from {fields['resumed_from']} (step {fields.get('step')})"
                    self._line(msg, log)
            elif kind in ("log", "eval"):
                self.history.append(fields)
                self._line(log_line({k: v for k, v in fields.items() if k != "step"}), log)
            elif kind == "summary":
                self._line(str(fields), log)
            elif kind == "end":
                self._end(str(event.get("status")), str(event.get("message") or ""), log)

    def _end(self, status: str, message: str, log: Callable[[str], None]) -> None:
        """The run's own end event, or the CLI's last line (often both: said once)."""
        if status == "finished":
            if message:
                self._line(message, log)
        elif message and message != self.message:
            self.message = message
            self._line(("error: " if status == "error" else "") + message, log)

    def _line(self, text: str, log: Callable[[str], None]) -> None:
        self.lines.append(text)
        if len(self.lines) > MAX_LINES:
            cut = len(self.lines) - MAX_LINES
            del self.lines[:cut]
            self.dropped += cut
        log(f"[{self.id}] {text}")

    def _finish(self, code: int, log: Callable[[str], None]) -> None:
        with self.lock:
            self.exit_code, self.ended = code, time.time()
            if code == 0:
                self.status = "finished"
            elif code == 130:
                self.status = "stopped"
                self.message = self.message or "stopped; continue with Resume"
            else:
                self.status = "failed"
                if not self.message:
                    self.message = self._crash_message(code)
            log(
                f"[{self.id}] {self.status} (exit code {code})" + (f": {self.message}" * bool(code))
            )
        self.done.set()

    def _crash_message(self, code: int) -> str:
        """A run that died without its one-line error: a signal, an out-of-memory kill, a bug."""
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exited with code {code}"
        )
        last = next((ln for ln in reversed(self.lines) if ln.strip()), "")
        tail = f" (last output: {last[-200:]})" if last else ""
        resume = ""
        if self.kind == "train":
            found = checkpoints(self.output_dir) if self.output_dir.is_dir() else []
            resume = (
                f"; its last complete checkpoint is {found[-1].name}: Resume continues from it"
                if found
                else "; no checkpoint was written yet"
            )
        return f"the {self.kind} run {how}{tail}{resume}"

    def stop(self) -> None:
        """Like Ctrl-C: train checkpoints and exits; a second stop is ignored while it does so."""
        with self.lock:
            if self.proc is None or not self.running or self.status == "stopping":
                return
            self.status = "stopping"
        try:
            os.kill(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def snapshot(self, since: int = 0) -> dict:
        """What the page polls: state, progress, the curve so far, log lines from ``since``."""
        with self.lock:
            start = max(since - self.dropped, 0)
            return {
                "id": self.id,
                "kind": self.kind,
                "status": self.status,
                "exit_code": self.exit_code,
                "message": self.message,
                "command": self.command,
                "output_dir": str(self.output_dir),
                "dir": self.shown,
                "pid": self.proc.pid if self.proc else None,
                "progress": dict(self.progress),
                "history": list(self.history),
                "lines": self.lines[start:],
                "next": self.dropped + len(self.lines),
                "started": self.started,
                "ended": self.ended,
            }


class Jobs:
    """All runs started from the page; at most one running job per output folder."""

    def __init__(self, cwd: Path, log: Callable[[str], None]):
        self.cwd, self.log = cwd, log
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.counter = itertools.count(1)

    def start(
        self, kind: str, module: str, flags: list[str], output_dir: Path, shown: str = ""
    ) -> Job:
        with self.lock:
            busy = self.active_for(output_dir)
            if busy is not None:
                raise Busy(
                    f"{output_dir} is being written by {busy.id} ({busy.kind}, {busy.status}); "
                    "stop it first or choose another output folder"
                )
            jid = f"{kind}-{next(self.counter)}"
            job = Job(jid, kind, module, flags, output_dir, self.cwd, shown)
            job.start(self.log)
            self.jobs[job.id] = job
        return job

    def get(self, jid: str) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise MlxLoraError(f"no job {jid!r} in this studio session")
        return job

    def active_for(self, output_dir: Path) -> Job | None:
        return next(
            (j for j in self.jobs.values() if j.running and j.output_dir == output_dir), None
        )

    def latest_for(self, output_dir: Path, kind: str) -> Job | None:
        """The newest job of ``kind`` that wrote ``output_dir`` (running or not)."""
        mine = [j for j in self.jobs.values() if j.kind == kind and j.output_dir == output_dir]
        return max(mine, key=lambda j: j.started) if mine else None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every running job as Ctrl-C would (checkpoint), kill what does not end in time."""
        running = [j for j in self.jobs.values() if j.running]
        for j in running:
            j.stop()
        deadline = time.time() + timeout
        for j in running:
            if not j.done.wait(max(0.0, deadline - time.time())) and j.proc is not None:
                self.log(f"[{j.id}] did not stop within {timeout:.0f} s; killing it")
                j.proc.kill()
                j.done.wait(5)
