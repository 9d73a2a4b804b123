"""``python -m mlx_lora.studio [--host 127.0.0.1] [--port 7860] [--root DIR]``."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

from mlx_lora.config import opt, parse_config
from mlx_lora.studio.api import Studio
from mlx_lora.studio.chatting import ChatModels
from mlx_lora.studio.jobs import Jobs
from mlx_lora.studio.paths import Roots
from mlx_lora.studio.server import WILDCARD_HOSTS, check_port, log, make_server


@dataclass
class StudioConfig:
    host: str = opt(
        "127.0.0.1",
        "address to listen on; 0.0.0.0 makes the studio reachable from other machines (no login!)",
    )
    port: int = opt(7860, "port to listen on, 1-65535 (0 = any free port)")
    root: str = opt(
        ".",
        "the folders the page may read and write (several: separated by ':'); paths outside them "
        "are refused",
    )
    allow_host: str = opt(
        "",
        "more names the page may be reached by (comma-separated, e.g. a DNS name of this machine); "
        "requests naming any other host are refused",
    )


DESCRIPTION = """A local web page for the whole road: train (with a preview of the data as the chat
template renders it), watch loss curves live, chat with an adapter side by side with its base,
export to GGUF + Ollama Modelfile with verification. 中文 / English."""

EPILOG = """examples:
  python -m mlx_lora.studio                   # http://127.0.0.1:7860, files under this folder
  python -m mlx_lora.studio --root ~/llm --port 8080"""

WARN_PUBLIC = (
    "warning: --host {host} makes the studio reachable from other machines; it has no login, so "
    "anyone who can reach port {port} can train, export and read files under --root"
)


def build(cfg: StudioConfig):  # -> tuple[Studio, ThreadingHTTPServer]
    """The studio's state and its bound server (tests call this and serve in a thread)."""

    check_port(cfg.port)  # before anything starts: a bad --port is one line, not a traceback
    extra = tuple(n.strip() for n in cfg.allow_host.split(",") if n.strip())
    roots = Roots.parse(cfg.root)
    studio = Studio(roots, Jobs(roots.dirs[0], log), ChatModels(), cfg.host, cfg.port)
    try:
        return studio, make_server(studio, extra)
    except BaseException:
        studio.chat.close()  # its worker thread would outlive the failed start
        raise


def serve(cfg: StudioConfig) -> None:
    """Serve until Ctrl-C or SIGTERM; running jobs then get a Ctrl-C of their own (checkpoint)."""

    studio, server = build(cfg)
    if cfg.host in WILDCARD_HOSTS or cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(WARN_PUBLIC.format(host=cfg.host, port=studio.port), file=sys.stderr, flush=True)
    shown = "127.0.0.1" if cfg.host in WILDCARD_HOSTS else cfg.host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"mlx_lora studio: http://{shown}:{studio.port}/  (Ctrl-C to stop)", flush=True)
    log(f"folders: {studio.roots.describe()}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        running = [j for j in studio.jobs.jobs.values() if j.running]
        if running:
            log(f"stopping {len(running)} running job(s) as Ctrl-C would (they checkpoint)")
        studio.jobs.shutdown()
    finally:
        server.server_close()
        studio.chat.close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(StudioConfig, argv, "python -m mlx_lora.studio", DESCRIPTION, EPILOG)
    serve(cfg)


if __name__ == "__main__":
    from mlx_lora.core.cli import run

    sys.exit(run(main))
