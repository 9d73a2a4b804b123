"""HTTP for the studio: the page, its static files and a small JSON API, on the standard library.

Requests are handled in threads (``ThreadingHTTPServer``), so a long preview or a streaming answer
does not block the page's polling. Any error inside a request becomes a JSON ``{"error": ...}``
answer and a line in the studio's log; the server keeps serving. Cross-site requests are refused:
the ``Host`` header must name the studio (no DNS rebinding), and POSTs must be JSON from the
studio's own origin (a foreign page cannot send them without a CORS preflight, which is never
granted).
"""

from __future__ import annotations

import json
import mimetypes
import sys
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.studio import api
from mlx_lora.studio.chatting import Disconnected, check_messages, sampling_settings
from mlx_lora.studio.jobs import Busy
from mlx_lora.studio.paths import OutsideRoot
from mlx_lora.studio.preview import preview

STATIC = Path(__file__).with_name("static")
MAX_BODY = 1_000_000
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def log(message: str) -> None:
    """The studio's log: stderr, one line per event, with the time."""
    print(f"[studio {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def static_files() -> dict[str, Path]:
    """URL path → file, fixed at start: nothing outside ``static/`` can ever be named."""
    files = {"/": STATIC / "index.html"}
    for p in STATIC.rglob("*"):
        if p.is_file():
            files["/static/" + p.relative_to(STATIC).as_posix()] = p
    return files


class Handler(BaseHTTPRequestHandler):
    server_version = "mlx_lora-studio"
    studio: api.Studio
    files: dict[str, Path]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are not news; errors are logged where they happen

    # ------------------------------------------------------------------ plumbing

    def _allowed_host(self) -> bool:
        s = self.studio
        if s.host in WILDCARD_HOSTS:
            return True
        host = self.headers.get("Host", "")
        names = {s.host, "127.0.0.1", "localhost", "[::1]"}
        return host in {f"{n}:{s.port}" for n in names}

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json")

    def _body(self) -> dict:
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            raise PermissionError("POST requests must be application/json")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            raise PermissionError(f"requests from {origin} are refused")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise MlxLoraError("request too large")
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MlxLoraError("the request is not valid JSON") from None
        if not isinstance(data, dict):
            raise MlxLoraError("the request must be a JSON object")
        return data

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            if not self._allowed_host():
                raise PermissionError(f"unknown Host {self.headers.get('Host')!r}")
            if method == "GET" and url.path in self.files:
                p = self.files[url.path]
                ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                return self._send(200, p.read_bytes(), ctype)
            if method == "POST" and url.path == "/api/chat":
                return self._chat(self._body())
            route = ROUTES.get((method, url.path))
            if route is None:
                return self._json(404, {"error": f"no such page: {method} {url.path}"})
            arg = (
                self._body()
                if method == "POST"
                else {k: v[-1] for k, v in parse_qs(url.query).items()}
            )
            self._json(200, route(self.studio, arg))
        except (BrokenPipeError, ConnectionResetError):
            log(f"{method} {url.path}: the browser disconnected")
        except Exception as e:  # noqa: BLE001 - every failure becomes a message; serving goes on
            self._fail(method, url.path, e)

    def _fail(self, method: str, path: str, e: Exception) -> None:
        if isinstance(e, PermissionError):
            status, msg = HTTPStatus.FORBIDDEN, str(e)
        elif isinstance(e, OutsideRoot):
            status, msg = HTTPStatus.FORBIDDEN, str(e)
        elif isinstance(e, Busy):
            status, msg = HTTPStatus.CONFLICT, str(e)
        elif isinstance(e, MlxLoraError):
            status, msg = HTTPStatus.BAD_REQUEST, str(e)
        else:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            msg = f"internal error ({type(e).__name__}: {e}); the studio keeps running"
            log("".join(traceback.format_exception(e)).rstrip())
        log(f"{method} {path}: {status.value} {msg}")
        try:
            self._json(status.value, {"error": msg})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------------ streaming chat

    def _chat(self, body: dict) -> None:
        """One answer as newline-delimited JSON: {"delta": …}… then {"done": …} or {"error": …}."""
        s = self.studio
        messages = check_messages(body.get("messages"))
        settings = sampling_settings(body)
        model, adapter_path = api.chat_target(s, body)
        req = s.chat.ask(model, adapter_path, messages, settings)
        kind, value = req.events.get()
        if kind == "error":  # nothing sent yet: an ordinary JSON error answer
            raise value
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            while True:
                kind, value = req.events.get()
                if kind == "delta":
                    self._line({"delta": value})
                    continue
                if kind == "error":
                    log(f"chat: {value}")
                    self._line({"error": str(value)})
                else:
                    self._line(value)
                break
        except Disconnected:
            req.cancel.set()
            log("chat: the browser disconnected mid-answer; generation stopped")

    def _line(self, obj: dict) -> None:
        try:
            self.wfile.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
            self.wfile.flush()
        except OSError:  # broken pipe, connection reset: the browser is gone
            raise Disconnected from None


def _job(studio: api.Studio, q: dict) -> dict:
    return studio.jobs.get(q.get("id", "")).snapshot(int(q.get("since") or 0))


def _stop(studio: api.Studio, body: dict) -> dict:
    job = studio.jobs.get(str(body.get("id", "")))
    job.stop()
    log(f"[{job.id}] stop requested from the page (SIGINT)")
    return job.snapshot()


def _jobs(studio: api.Studio, q: dict) -> dict:
    return {"jobs": [j.snapshot(since=10**12) for j in studio.jobs.jobs.values()]}


ROUTES: dict[tuple[str, str], Callable[[api.Studio, dict], Any]] = {
    ("GET", "/api/info"): lambda s, q: api.info(s),
    ("GET", "/api/scan"): lambda s, q: api.found(s),
    ("GET", "/api/job"): _job,
    ("GET", "/api/jobs"): _jobs,
    ("GET", "/api/export/result"): lambda s, q: api.export_result(s, q.get("id", "")),
    ("POST", "/api/preview"): lambda s, b: _preview(s, b),
    ("POST", "/api/plan"): api.plan,
    ("POST", "/api/train"): api.start_train,
    ("POST", "/api/stop"): _stop,
    ("POST", "/api/resume"): api.resume_job,
    ("POST", "/api/export"): api.start_export,
    ("POST", "/api/runs"): api.runs,
}


def _preview(studio: api.Studio, body: dict) -> dict:

    data = studio.roots.resolve(body.get("data") or "", what="data file", must_exist=True)
    model = studio.roots.model(body.get("model") or "")
    try:
        max_len = int(body.get("max_seq_length") or 2048)
    except ValueError:
        raise MlxLoraError("max_seq_length: not a number") from None
    return preview(
        model,
        data,
        fmt=body.get("format") or "auto",
        system_prompt=body.get("system_prompt") or None,
        max_seq_length=max_len,
    )


def make_server(studio: api.Studio) -> ThreadingHTTPServer:
    """Bind the port (a port in use is a one-line error) and wire the handler to ``studio``."""
    import errno
    import socket

    handler = type("StudioHandler", (Handler,), {"studio": studio, "files": static_files()})
    server_cls = type(
        "StudioServer",
        (ThreadingHTTPServer,),
        {
            "daemon_threads": True,
            "allow_reuse_address": True,
            "address_family": socket.AF_INET6 if ":" in studio.host else socket.AF_INET,
        },
    )
    try:
        server = server_cls((studio.host, studio.port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise MlxLoraError(
                f"port {studio.port} on {studio.host} is in use (another studio or program); "
                "pass --port N, or --port 0 for any free port"
            ) from None
        raise MlxLoraError(f"cannot listen on {studio.host}:{studio.port} ({e.strerror})") from None
    studio.port = server.server_address[1]
    return server
