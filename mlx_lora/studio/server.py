"""HTTP for the studio: the page, its static files and a small JSON API, on the standard library.

Requests are handled in threads (``ThreadingHTTPServer``), so a long preview or a streaming answer
does not block the page's polling. Any error inside a request, the standard library's own
refusals included (a request line too long, an unknown method), becomes a JSON ``{"error": ...}``
answer of one line (4xx for bad input) and a line in the studio's log; the server keeps serving.

Cross-site requests are refused (403): the ``Host`` header must be one of the studio's own names,
the loopback names and, with a non-loopback ``--host``, this machine's names and addresses (plus
``--allow-host``), so a DNS-rebound foreign name never reaches the API; and POSTs must be JSON whose
``Origin``, when sent, is the studio's own (a foreign page cannot send JSON without a CORS
preflight, which is never granted). A body needs a ``Content-Length`` (411) of at most
``MAX_BODY`` bytes (413) that arrives within the socket timeout (400).
"""

from __future__ import annotations

import errno
import json
import mimetypes
import re
import socket
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
from mlx_lora.studio.fields import integer, parse_body, text
from mlx_lora.studio.jobs import Busy
from mlx_lora.studio.paths import OutsideRoot, loadable
from mlx_lora.studio.preview import preview

STATIC = Path(__file__).with_name("static")
MAX_BODY = 1_000_000
SOCKET_TIMEOUT = 20.0  # seconds a client may take to send its request (a body that never comes)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LENGTH = re.compile(r"[0-9]+")


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


class HttpError(MlxLoraError):
    """A request the HTTP layer refuses with ``status`` (411, 413, 400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def machine_names() -> set[str]:
    """This machine's host name(s) and addresses, as other machines may reach it."""
    host = socket.gethostname()
    names = {host, f"{host}.local", socket.getfqdn()}
    for name in list(names):
        try:
            names |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # the address of the default route; a UDP connect sends nothing
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                names.add(str(s.getsockname()[0]))
        except OSError:
            pass
    return {n for n in names if n and "%" not in n}  # link-local zones cannot be in a Host


def own_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The ``Host`` header values that name this studio: ``name:port`` (``[v6]:port``), and the
    bare name on port 80. Loopback always; this machine's names when ``host`` is not loopback."""
    names = {*LOOPBACK, host, *extra}
    if host not in LOOPBACK:
        names |= machine_names()
    out = set()
    for name in names - set(WILDCARD_HOSTS):
        shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
        out.add(f"{shown}:{port}".lower())
        if port == 80:
            out.add(shown.lower())
    return frozenset(out)


class Handler(BaseHTTPRequestHandler):
    """One request: the Host and Origin guards, the body's limits, then a route."""

    server_version = "mlx_lora-studio"
    timeout = SOCKET_TIMEOUT  # applied to the connection by StreamRequestHandler.setup
    studio: api.Studio
    files: dict[str, Path]
    unread = False  # a body was announced but not read: drain it before closing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are not news; errors are logged where they happen

    # ------------------------------------------------------------------ plumbing

    def _allowed_host(self) -> bool:
        """Exactly one ``Host`` header, naming the studio (see :func:`own_hosts`)."""
        hosts = self.headers.get_all("Host") or []
        return len(hosts) == 1 and hosts[0].strip().lower() in self.studio.hosts

    def __getattr__(self, name: str) -> Any:
        """Methods other than GET and POST get 405 in JSON (the standard library says 501)."""
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._json(405, {"error": f"method {self.command[:20]!r} not allowed; use GET or POST"})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a request line too long, too many headers, a bad
        HTTP version) as JSON, with a status line even for an HTTP/0.9-looking request."""
        self.close_connection = True
        code = 400 if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED else code  # the client's fault
        self.request_version = "HTTP/1.0"
        msg = (message or HTTPStatus(code).phrase).splitlines()[0][:300]
        log(f"{str(getattr(self, 'requestline', ''))[:80]!r}: {code} {msg}")
        try:
            self._json(code, {"error": msg})
        except OSError:
            return
        self._drain()  # the rest of a line or header block that was never read

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

    def _check_origin(self) -> None:
        """A POST from the studio's own page: JSON, its own Origin (when sent), not cross-site."""
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise PermissionError("POST requests must be application/json")
        origin = self.headers.get("Origin")
        if (
            origin is not None
            and origin.lower() != f"http://{self.headers.get('Host', '')}".lower()
        ):
            raise PermissionError(f"requests from {origin[:100]!r} are refused")
        site = self.headers.get("Sec-Fetch-Site", "same-origin").lower()
        if site not in ("same-origin", "none"):
            raise PermissionError(f"{site} requests are refused")

    def _body(self) -> dict:
        """The JSON object of a POST, after the origin guard and within the size limits."""
        self._check_origin()
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(
                411, "a POST needs a Content-Length header (chunked bodies are refused)"
            )
        if not _LENGTH.fullmatch(length.strip()):
            raise HttpError(400, f"Content-Length {length[:30]!r} is not a number of bytes")
        n = int(length) if len(length.strip()) <= 15 else MAX_BODY + 1
        if n > MAX_BODY:
            raise HttpError(
                413, f"request too large ({length.strip()[:20]} bytes; at most {MAX_BODY})"
            )
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raw = None
        if raw is None or len(raw) < n:
            raise HttpError(
                400, f"the request body ended early (Content-Length {n}, received less in time)"
            )
        self.unread = False
        return parse_body(raw)

    def _drain(self) -> None:
        """Read what is left of an unread body before closing, so the client gets the answer
        rather than a reset connection (at most a few MB, a second)."""
        self.unread = False
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            for _ in range(64):
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        if method == "POST":
            announced = self.headers.get("Content-Length", "0").strip() != "0"
            self.unread = announced or "Transfer-Encoding" in self.headers
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
            if method == "POST" and url.path == "/api/chat/compare":
                return self._compare(self._body())
            route = ROUTES.get((method, url.path))
            if route is None:
                return self._json(404, {"error": f"no such page: {method} {url.path[:100]}"})
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
        if isinstance(e, HttpError):
            status, msg = HTTPStatus(e.status), str(e)
        elif isinstance(e, PermissionError | OutsideRoot):
            status, msg = HTTPStatus.FORBIDDEN, str(e)
        elif isinstance(e, Busy):
            status, msg = HTTPStatus.CONFLICT, str(e)
        elif isinstance(e, MlxLoraError):
            status, msg = HTTPStatus.BAD_REQUEST, str(e)
        else:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            msg = f"internal error ({type(e).__name__}: {e}); the studio keeps running"
            log("".join(traceback.format_exception(e)).rstrip())
        msg = msg.splitlines()[0] if msg.strip() else status.phrase  # one line on the page
        log(f"{method} {path[:100]}: {status.value} {msg}")
        try:
            self._json(status.value, {"error": msg})
        except OSError:  # the browser is gone (broken pipe, reset, timeout)
            return
        if self.unread:
            self.close_connection = True
            self._drain()

    # ------------------------------------------------------------------ streaming chat

    def _chat(self, body: dict) -> None:
        """One answer as newline-delimited JSON: {"delta": …}… then {"done": …} or {"error": …}."""
        s = self.studio
        messages = check_messages(body.get("messages"))
        settings = sampling_settings(body)
        model, adapter_path = api.chat_target(s, body)
        self._stream(s.chat.ask(model, adapter_path, messages, settings), "chat")

    def _compare(self, body: dict) -> None:
        """Several runs of one base answering, column after column, as newline-delimited JSON:
        {"column": i, "delta": …}…, {"column": i, "done": …} per column, then {"end": true}
        (or {"error": …})."""
        s = self.studio
        settings = sampling_settings(body)
        model, adapters, columns = api.compare_targets(s, body)
        self._stream(s.chat.compare(model, adapters, columns, settings), "compare")

    def _stream(self, req: Any, what: str) -> None:
        """The worker's events for ``req`` as JSON lines; an error before the first line is an
        ordinary JSON error answer, a browser that goes away stops generation."""
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
                if kind in ("delta", "line"):
                    self._line({"delta": value} if kind == "delta" else value)
                    continue
                if kind == "error":
                    log(f"{what}: {value}")
                    self._line({"error": str(value)})
                else:
                    self._line(value)
                break
        except Disconnected:
            req.cancel.set()
            log(f"{what}: the browser disconnected mid-answer; generation stopped")

    def _line(self, obj: dict) -> None:
        try:
            self.wfile.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
            self.wfile.flush()
        except OSError:  # broken pipe, connection reset: the browser is gone
            raise Disconnected from None


def _job(studio: api.Studio, q: dict) -> dict:
    since = integer(q, "since", 0, 0, 2**53)
    return studio.jobs.get(q.get("id", "")).snapshot(since)


def _stop(studio: api.Studio, body: dict) -> dict:
    job = studio.jobs.get(text(body, "id", "") or "")
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
    """The data preview for the Train form's model, data, format and prompt (checked here)."""
    data = studio.roots.resolve(body.get("data") or "", what="data file", must_exist=True)
    model = loadable(studio.roots.model(body.get("model")))
    return preview(
        model,
        data,
        fmt=text(body, "format", "auto") or "auto",
        system_prompt=text(body, "system_prompt"),
        max_seq_length=integer(body, "max_seq_length", 2048, 2, 2**20),
    )


def check_port(port: Any) -> int:
    """``--port``: 0 (any free port) to 65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise MlxLoraError(f"--port must be 0-65535 (0 = any free port), got {str(port)[:30]}")
    return port


def make_server(studio: api.Studio, allow_hosts: tuple[str, ...] = ()) -> ThreadingHTTPServer:
    """Bind the port (a port in use is a one-line error) and wire the handler to ``studio``."""
    check_port(studio.port)
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
        why = e.strerror or str(e) or type(e).__name__
        raise MlxLoraError(f"cannot listen on {studio.host}:{studio.port} ({why})") from None
    except (OverflowError, ValueError, UnicodeError) as e:  # a --host no socket can take
        raise MlxLoraError(f"cannot listen on {studio.host[:80]!r} ({e}); check --host") from None
    studio.port = server.server_address[1]
    studio.hosts = own_hosts(studio.host, studio.port, allow_hosts)
    return server
